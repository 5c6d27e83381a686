"""timm CNN backbones via features_only, with checkpoints from a local file."""

from __future__ import annotations

import pytest
import timm
import torch

from residual_core.backbones import (
    BackboneError,
    CheckpointError,
    TextEncoderUnavailableError,
    create_backbone,
)


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path_factory.mktemp("timm") / "resnet18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_shapes_grids_and_global(resnet_checkpoint):
    path, _ = resnet_checkpoint
    backbone = create_backbone(f"timm:resnet18@{path}", image_size=64)
    assert backbone.layers == (1, 2, 3)
    assert backbone.mean == pytest.approx((0.485, 0.456, 0.406))
    features = backbone(torch.randn(2, 3, 64, 64))
    assert features.grids == [(16, 16), (8, 8), (4, 4)]
    assert [tuple(t.shape) for t in features.patch_tokens] == [(2, 256, 64), (2, 64, 128), (2, 16, 256)]
    assert tuple(features.global_embedding.shape) == (2, 256)
    with pytest.raises(TextEncoderUnavailableError):
        backbone.encode_text(["x"])


def test_checkpoint_values_reach_the_features(resnet_checkpoint):
    path, model = resnet_checkpoint
    backbone = create_backbone(f"timm:resnet18@{path}", image_size=64, layers=(2,))
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model.eval().forward_intermediates(images, indices=[2], intermediates_only=True)[0]
        tokens = backbone(images).patch_tokens[0]
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2))
    assert len(backbone.identity.weights_sha256) == 64


def test_headless_checkpoint_loads_and_misfit_fails(tmp_path, resnet_checkpoint):
    _, model = resnet_checkpoint
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    headless = tmp_path / "headless.pth"
    torch.save(state, headless)
    create_backbone(f"timm:resnet18@{headless}", image_size=64)
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    del state["layer4.1.bn2.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as error:
        create_backbone(f"timm:resnet18@{bad}", image_size=64)
    assert "1 missing keys: layer4.1.bn2.bias" in str(error.value)
    assert "layer1.0.conv1.weight: file (64, 64, 1, 1) vs model (64, 64, 3, 3)" in str(error.value)


def test_flattened_feature_wrappers_are_filled():
    backbone = create_backbone("timm:convnext_atto", image_size=64, layers=(0, 1))
    features = backbone(torch.randn(1, 3, 64, 64))
    assert features.grids == [(16, 16), (8, 8)]


def test_bad_layers_and_sizes():
    with pytest.raises(BackboneError, match="out of range"):
        create_backbone("timm:resnet18", layers=(1, 7))
    with pytest.raises(BackboneError, match="multiple of the stride 16"):
        create_backbone("timm:resnet18", image_size=72)
    with pytest.raises(BackboneError, match="unknown timm architecture"):
        create_backbone("timm:not_a_model")
