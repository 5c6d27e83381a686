"""open_clip backbone: the authors' DPAM path, position-embedding interpolation, checkpoint loading."""

from __future__ import annotations

import copy
import io
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from residual_core.backbones import BackboneError, CheckpointError, create_backbone
from residual_core.backbones.openclip import (
    EXTRA_OPENCLIP_CONFIGS,
    default_clip_layers,
    default_dpam_layer,
    register_openclip_config,
)


@pytest.fixture(scope="module")
def tiny(tiny_openclip_checkpoint):
    return create_backbone(tiny_openclip_checkpoint.spec)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def _authors_dual_path(backbone, images, dpam_layer):
    """Independent transcription of clip_lib/AnomalyCLIP.py (DAPM_replace + AnomalyCLIP_forward),
    sequence-first like the authors; returns {layer: ln_post(token) @ proj without CLS}, global."""
    visual = backbone.model.visual
    x = visual.conv1(images).flatten(2).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1)
    pos = visual.positional_embedding
    side, new_side = int(math.sqrt(pos.shape[0] - 1)), int(math.sqrt(x.shape[1] - 1))
    if side != new_side:
        grid = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, (new_side, new_side), mode="bilinear")
        pos = torch.cat([pos[:1], grid.reshape(1, -1, new_side * new_side).transpose(1, 2)[0]])
    x = visual.ln_pre(x + pos).permute(1, 0, 2)  # LND
    blocks = visual.transformer.resblocks
    replaced = {len(blocks) - i for i in range(1, dpam_layer)}  # resblocks[-i] for i in 1..DPAM_layer-1
    taps, state = {}, x
    for index, block in enumerate(blocks):
        if index in replaced:
            x_new, x_ori = state if isinstance(state, list) else (state, state)
            h = block.ln_1(x_ori).transpose(0, 1)  # NLD
            n, length, width = h.shape
            heads = block.attn.num_heads
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, v = qkv.reshape(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
            scale = (width // heads) ** -0.5
            attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
            attn_vv = ((v @ v.transpose(-2, -1)) * scale).softmax(-1)
            out_ori = (attn_ori @ v).transpose(1, 2).reshape(n, length, width)
            out_vv = (attn_vv @ v).transpose(1, 2).reshape(n, length, width)
            out_ori = F.linear(out_ori, block.attn.out_proj.weight, block.attn.out_proj.bias).transpose(0, 1)
            out_vv = F.linear(out_vv, block.attn.out_proj.weight, block.attn.out_proj.bias).transpose(0, 1)
            x_ori = x_ori + out_ori
            x_ori = x_ori + block.mlp(block.ln_2(x_ori))
            state = [x_new + out_vv, x_ori]  # the new path skips the FFN
        else:
            x = state
            h = block.ln_1(x).transpose(0, 1) if block.attn.batch_first else block.ln_1(x)
            out = block.attn(h, h, h, need_weights=False)[0]
            x = x + (out.transpose(0, 1) if block.attn.batch_first else out)
            state = x + block.mlp(block.ln_2(x))
        taps[index + 1] = state[0] if isinstance(state, list) else state
    final = state[1] if isinstance(state, list) else state
    tokens = {layer: (visual.ln_post(t.permute(1, 0, 2)) @ visual.proj)[:, 1:] for layer, t in taps.items()}
    return tokens, final[0] @ visual.proj


def test_defaults_follow_the_authors():
    assert default_clip_layers(24) == (6, 12, 18, 24)
    assert default_clip_layers(12) == (3, 6, 9, 12)
    assert default_clip_layers(4) == (1, 2, 3, 4)
    assert default_dpam_layer(24) == 20
    assert default_dpam_layer(12) == 10
    assert default_dpam_layer(4) == 3


def test_shapes_grids_and_metadata(tiny, images, tiny_openclip_checkpoint):
    features = tiny.forward_features(images)
    assert tiny.layers == (1, 2, 3, 4) and tiny.image_size == 64 and tiny.has_text
    assert [tuple(t.shape) for t in features.patch_tokens] == [(2, 16, 32)] * 4
    assert features.grids == [(4, 4)] * 4
    assert tuple(features.global_embedding.shape) == (2, 32)
    assert tiny.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert tiny.std == pytest.approx((0.26862954, 0.26130258, 0.27577711))
    assert tiny.identity.weights_sha256 == tiny_openclip_checkpoint.sha256
    assert tiny.identity.name == tiny_openclip_checkpoint.spec
    assert not any(p.requires_grad for p in tiny.parameters())


@pytest.mark.parametrize("image_size", [64, 96])
def test_dpam_path_matches_the_authors_transcription(tiny_openclip_checkpoint, image_size):
    backbone = create_backbone(tiny_openclip_checkpoint.spec, image_size=image_size)
    images = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        features = backbone.forward_features(images)
        expected, expected_global = _authors_dual_path(backbone, images, backbone.dpam_layer)
    for layer, tokens in zip(backbone.layers, features.patch_tokens, strict=True):
        torch.testing.assert_close(tokens, expected[layer], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features.global_embedding, expected_global, rtol=1e-4, atol=1e-5)


def test_dpam_changes_late_layers_only(tiny_openclip_checkpoint, images):
    with_dpam = create_backbone(tiny_openclip_checkpoint.spec)  # dpam_layer 3: blocks 3, 4 replaced
    without = create_backbone(tiny_openclip_checkpoint.spec, dpam_layer=1)
    with torch.no_grad():
        a, b = with_dpam(images), without(images)
    torch.testing.assert_close(a.patch_tokens[0], b.patch_tokens[0])
    torch.testing.assert_close(a.patch_tokens[1], b.patch_tokens[1])
    assert not torch.allclose(a.patch_tokens[3], b.patch_tokens[3], atol=1e-3)
    torch.testing.assert_close(a.global_embedding, b.global_embedding)  # original path is untouched
    assert with_dpam.identity.key() != without.identity.key()
    assert without.identity.name.endswith("|dpam_layer=1")


def test_without_dpam_equals_open_clip_forward(tiny_openclip_checkpoint, images):
    plain = create_backbone(tiny_openclip_checkpoint.spec, dpam_layer=1, global_ln_post=True)
    visual = plain.model.visual
    with torch.no_grad():
        features = plain(images)
        reference = visual.forward_intermediates(images, indices=[0, 1, 2, 3], output_fmt="NLC")
        torch.testing.assert_close(features.global_embedding, plain.model.encode_image(images))
        for tokens, inter in zip(features.patch_tokens, reference["image_intermediates"], strict=True):
            torch.testing.assert_close(tokens, visual.ln_post(inter) @ visual.proj)


def test_position_embedding_interpolation(tiny_openclip_checkpoint):
    backbone = create_backbone(tiny_openclip_checkpoint.spec, image_size=96, layers=(2, 4))
    features = backbone(torch.randn(1, 3, 96, 96))
    assert features.grids == [(6, 6), (6, 6)]
    assert [tuple(t.shape) for t in features.patch_tokens] == [(1, 36, 32)] * 2
    pos = backbone._positional_embedding(4, 4)
    torch.testing.assert_close(pos, backbone.model.visual.positional_embedding)  # native size: unchanged
    resized = backbone._positional_embedding(6, 6)
    assert tuple(resized.shape) == (37, 64)
    torch.testing.assert_close(resized[0], pos[0])
    assert backbone.identity.image_size == 96


def test_bad_sizes_and_layers_fail_clearly(tiny_openclip_checkpoint, tiny):
    with pytest.raises(BackboneError, match="multiple of the patch size 16"):
        create_backbone(tiny_openclip_checkpoint.spec, image_size=70)
    with pytest.raises(BackboneError, match="out of range"):
        create_backbone(tiny_openclip_checkpoint.spec, layers=(2, 5))
    with pytest.raises(BackboneError, match="unknown option"):
        create_backbone(tiny_openclip_checkpoint.spec, dpam=3)
    with pytest.raises(BackboneError, match="64x64"):
        tiny(torch.randn(1, 3, 96, 96))


def test_checkpoint_loads_through_an_opener(tiny_openclip_checkpoint, tiny, images):
    data = tiny_openclip_checkpoint.path.read_bytes()
    opened = []

    def opener(url):
        opened.append(url)
        return io.BytesIO(data)

    remote = create_backbone("openclip:ResidualAD-Tiny-ViT-16@s3://models/tiny.safetensors", opener=opener)
    assert opened == ["s3://models/tiny.safetensors"]
    assert remote.identity.weights_sha256 == tiny_openclip_checkpoint.sha256
    with torch.no_grad():
        torch.testing.assert_close(remote(images).patch_tokens[-1], tiny(images).patch_tokens[-1])
    with pytest.raises(CheckpointError, match="opener"):
        create_backbone("openclip:ResidualAD-Tiny-ViT-16@s3://models/tiny.safetensors")


def test_weights_are_really_loaded(tiny_openclip_checkpoint, tiny):
    saved = load_file(str(tiny_openclip_checkpoint.path))
    state = tiny.model.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(state[name], tensor)
    random_init = create_backbone("openclip:ResidualAD-Tiny-ViT-16")
    assert random_init.identity.weights_sha256 == ""
    assert not torch.equal(random_init.model.visual.proj, tiny.model.visual.proj)


def test_torch_file_checkpoint_with_wrapper(tmp_path, tiny_openclip_checkpoint, tiny, images):
    saved = load_file(str(tiny_openclip_checkpoint.path))
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)
    loaded = create_backbone(f"openclip:ResidualAD-Tiny-ViT-16@{path}")
    with torch.no_grad():
        torch.testing.assert_close(loaded(images).global_embedding, tiny(images).global_embedding)


def test_mismatched_checkpoint_fails_clearly(tmp_path, tiny_openclip_checkpoint):
    saved = load_file(str(tiny_openclip_checkpoint.path))
    saved.pop("visual.proj")
    saved["visual.extra.weight"] = torch.zeros(3)
    saved["visual.conv1.weight"] = torch.zeros(64, 3, 14, 14)
    path = tmp_path / "bad.safetensors"
    save_file(saved, str(path))
    with pytest.raises(CheckpointError) as error:
        create_backbone(f"openclip:ResidualAD-Tiny-ViT-16@{path}")
    message = str(error.value)
    assert "1 missing keys: visual.proj" in message
    assert "1 unexpected keys: visual.extra.weight" in message
    assert "visual.conv1.weight: file (64, 3, 14, 14) vs model (64, 3, 16, 16)" in message


def test_other_architecture_checkpoint_fails_clearly(tiny_openclip_checkpoint):
    config = copy.deepcopy(EXTRA_OPENCLIP_CONFIGS["ResidualAD-Tiny-ViT-16"])
    config["vision_cfg"].update(patch_size=8, layers=3)
    register_openclip_config("ResidualAD-Tiny-ViT-8-test", config)
    with pytest.raises(CheckpointError, match="do not fit CLIP") as error:
        create_backbone(f"openclip:ResidualAD-Tiny-ViT-8-test@{tiny_openclip_checkpoint.path}")
    assert "unexpected keys: visual.transformer.resblocks.3." in str(error.value)
    assert "visual.positional_embedding: file (17, 64) vs model (65, 64)" in str(error.value)


def test_encode_text_uses_the_model_tokenizer(tiny):
    texts = ["a photo of a damaged object", "a photo of a flawless object"]
    embeddings = tiny.encode_text(texts)
    assert tuple(embeddings.shape) == (2, 32)
    tokens = open_clip.SimpleTokenizer()(texts)
    with torch.no_grad():
        torch.testing.assert_close(embeddings, tiny.model.encode_text(tokens))
    with pytest.raises(BackboneError, match="list of strings"):
        tiny.encode_text("not a list")


def test_unknown_architecture_and_train_mode(tiny):
    with pytest.raises(BackboneError, match="unknown architecture"):
        create_backbone("openclip:No-Such-ViT")
    tiny.train()
    assert not tiny.training and not tiny.model.training


def test_state_hash_for_tag_weights_is_deterministic(tiny):
    from residual_core.backbones.openclip import _state_sha256

    assert _state_sha256(tiny.model) == _state_sha256(tiny.model)
    assert len(_state_sha256(tiny.model)) == 64
