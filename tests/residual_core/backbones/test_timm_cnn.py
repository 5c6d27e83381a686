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


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv3_small_050"])
@pytest.mark.parametrize("layers", [(0,), (1, 2, 3), (2,), (1, 4), (0, 1, 2, 3, 4)])
def test_feature_models_stop_after_the_deepest_level_with_the_same_features(arch, layers):
    """EfficientNet / MobileNetV3 feature models ran every stage whatever the levels; the cut one gives
    timm's own features bit for bit (timm's feature model, all stages, as the reference)."""
    from residual_core.backbones.timm_cnn import drop_unused_stages

    torch.manual_seed(0)
    reference = timm.create_model(arch, pretrained=False, features_only=True, out_indices=layers).eval()
    cut = timm.create_model(arch, pretrained=False, features_only=True, out_indices=layers).eval()
    cut.load_state_dict(reference.state_dict())
    stages = len(cut.blocks)
    drop_unused_stages(cut)
    deepest = max(int(m.split(".")[1]) if m.startswith("blocks.") else -1
                  for m in cut.feature_info.module_name())
    assert len(cut.blocks) == deepest + 1 <= stages
    assert (len(cut.blocks) < stages) == (4 not in layers)  # level 4 is the last stage: nothing to cut
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected, got = reference(images), cut(images)
    assert len(got) == len(expected) == len(layers)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_effnet_lite0_runs_only_the_stages_its_levels_need():
    backbone = create_backbone("effnet-lite0", image_size=64)
    assert len(backbone.features.blocks) == 5  # levels (1, 2, 3) end at blocks.4; blocks 5 and 6 are cut
    assert len(create_backbone("effnet-lite0", image_size=64, layers=(4,)).features.blocks) == 7
