"""Spec parsing, identities, and the checkpoint reader."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from residual_core.backbones import BackboneError, BackboneIdentity, CheckpointError, parse_spec
from residual_core.backbones.checkpoints import load_checked, read_weights


def test_parse_spec():
    spec = parse_spec("openclip:ViT-L-14-336@s3://bucket/clip@v2.safetensors")
    assert (spec.kind, spec.arch, spec.weights) == (
        "openclip",
        "ViT-L-14-336",
        "s3://bucket/clip@v2.safetensors",
    )
    assert parse_spec("effnet-lite0") == parse_spec("effnet-lite0")
    assert parse_spec("effnet-lite0").arch is None
    assert parse_spec("timm:wide_resnet50_2").weights is None
    for bad, reason in [
        ("vgg:16", "unknown kind"),
        ("openclip:", "empty architecture"),
        ("timm:resnet18@", "empty weights"),
        (" effnet-lite0", "surrounding spaces"),
        ("", "non-empty"),
    ]:
        with pytest.raises(BackboneError, match=reason):
            parse_spec(bad)


def test_identity_key_is_stable_and_round_trips():
    identity = BackboneIdentity(
        name="effnet-lite0", weights_sha256="ab" * 32, layers=(1, 2, 3), image_size=224
    )
    assert identity.key() == BackboneIdentity.from_dict(identity.to_dict()).key()
    assert identity.key() == "98273fc75894986c"  # must not change across versions: it names caches
    assert (
        len(
            {identity.key()}
            | {
                BackboneIdentity("effnet-lite0", "ab" * 32, (1, 2), 224).key(),
                BackboneIdentity("effnet-lite0", "ab" * 32, (1, 2, 3), 256).key(),
                BackboneIdentity("effnet-lite0", "", (1, 2, 3), 224).key(),
                BackboneIdentity("timm:x", "ab" * 32, (1, 2, 3), 224).key(),
            }
        )
        == 5
    )


def _opener_for(data: bytes):
    return lambda url: io.BytesIO(data)


def test_read_weights_formats():
    tensors = {"a.weight": torch.arange(6.0).reshape(2, 3)}
    safetensors_bytes = save_safetensors(tensors)
    loaded = read_weights("mem://x.safetensors", _opener_for(safetensors_bytes))
    torch.testing.assert_close(loaded.state_dict["a.weight"], tensors["a.weight"])
    buffer = io.BytesIO()
    torch.save({"model": {"module.a.weight": tensors["a.weight"]}, "step": 3}, buffer)
    loaded = read_weights("mem://x.pt", _opener_for(buffer.getvalue()))
    assert list(loaded.state_dict) == ["a.weight"]
    assert len(loaded.sha256) == 64


def test_read_weights_refuses_unsafe_or_broken_files(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buffer = io.BytesIO()
    torch.save({"w": Evil()}, buffer)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_weights("mem://evil.pt", _opener_for(buffer.getvalue()))
    with pytest.raises(CheckpointError, match="empty"):
        read_weights("mem://empty", _opener_for(b""))
    with pytest.raises(CheckpointError, match="does not exist"):
        read_weights(str(tmp_path / "missing.pt"))


def test_load_checked_lists_every_kind_of_misfit():
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError) as error:
        load_checked(model, state, source="file.pt")
    message = str(error.value)
    assert "2 missing keys: 1.bias, 1.weight" in message
    assert "1 unexpected keys: 2.weight" in message
    assert "0.bias: file (4,) vs model (3,)" in message


def test_local_files_in_every_format(tmp_path):
    tensors = {"w": torch.arange(4.0)}
    legacy = tmp_path / "legacy.pt"
    torch.save(tensors, legacy, _use_new_zipfile_serialization=False)
    zipped = tmp_path / "zipped.pt"
    torch.save(tensors, zipped)
    for path in (legacy, zipped, f"file://{zipped}"):
        torch.testing.assert_close(read_weights(str(path)).state_dict["w"], tensors["w"])
    scripted = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(scripted))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        read_weights(str(scripted))
    with pytest.raises(CheckpointError, match="TorchScript archive"):
        read_weights("mem://scripted.pt", _opener_for(scripted.read_bytes()))
