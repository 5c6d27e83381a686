"""Fusion, smoothing and image scores on hand-checkable tiny cases."""

import math

import pytest
import torch

from residual_core.methods.res2clip import default_config, scoring


def test_gaussian_kernel_matches_the_closed_form():
    kernel = scoring.gaussian_kernel(5, 4.0)
    assert kernel.shape == (5, 5)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-6)
    raw = torch.tensor(
        [[math.exp(-((i - 2) ** 2 + (j - 2) ** 2) / 32.0) for j in range(5)] for i in range(5)]
    )
    torch.testing.assert_close(kernel, raw / raw.sum())
    assert torch.equal(kernel, kernel.T) and torch.equal(kernel, kernel.flip(0))


def test_smoothing_keeps_interior_of_constant_map_and_zero_pads_borders():
    kernel = scoring.gaussian_kernel(5, 4.0)
    smoothed = scoring.gaussian_smooth(torch.full((1, 9, 9), 2.0), kernel)
    torch.testing.assert_close(smoothed[:, 2:-2, 2:-2], torch.full((1, 5, 5), 2.0))
    # corner: only the 3x3 lower-right block of the kernel overlaps the image (zero padding)
    assert smoothed[0, 0, 0].item() == pytest.approx(2.0 * kernel[2:, 2:].sum().item(), rel=1e-5)


def test_top_fraction_mean_takes_max_one_or_one_percent():
    maps = torch.arange(400, dtype=torch.float32).view(1, 20, 20)
    assert scoring.top_fraction_mean(maps, 0.01).item() == pytest.approx((399 + 398 + 397 + 396) / 4)
    small = torch.tensor([[[1.0, 5.0], [3.0, 2.0]]])
    assert scoring.top_fraction_mean(small, 0.01).item() == 5.0  # max(1, int(4 * 0.01)) = 1


@pytest.mark.parametrize(
    ("mode", "pixel", "image"),
    [
        ("training-free", 0.1 * 1 + 2 + 3, (0.5 * 1 + 0.5 * 0.4) + 2 + (0.5 * 3 + 0.5 * 0.2)),
        ("finetune", 0.1 * 1 + 2 + 0.1 * 3, (0.5 * 1 + 0.5 * 0.4) + 2 + 0.1 * (0.5 * 3 + 0.5 * 0.2)),
    ],
)
def test_fusion_follows_the_authors_weights(mode, pixel, image):
    """Constant branch maps 1 / 2 / 3, global scores text 0.4 and residual 0.2."""
    config = default_config(mode)
    kernel = scoring.gaussian_kernel(config.gaussian_kernel_size, config.gaussian_sigma)
    size = 20
    # layer maps of 4x4 patches, two layers each: their mean is the constant
    layer_maps = {
        "text": [torch.full((1, 4, 4), 0.5), torch.full((1, 4, 4), 1.5)],
        "visual": [torch.full((1, 4, 4), 2.0)],
        "residual": [torch.full((1, 4, 4), 3.0), torch.full((1, 4, 4), 3.0)],
    }
    branch_maps = {name: scoring.average_upsampled(maps, size, kernel) for name, maps in layer_maps.items()}
    fused = scoring.fuse_pixel_maps(branch_maps, config.pixel_weights, kernel)
    assert fused.shape == (1, size, size)
    # interior pixels (4 from the border: two smoothing passes) are the weighted sum of constants
    assert fused[0, 4:-4, 4:-4] == pytest.approx(torch.full((12, 12), pixel), abs=1e-5)
    globals_ = {"text": torch.tensor([0.4]), "residual": torch.tensor([0.2])}
    scores = {
        name: scoring.branch_image_score(
            branch_maps[name], globals_.get(name), config.top_fraction, config.global_share
        )
        for name in branch_maps
    }
    assert scores["visual"].item() == pytest.approx(2.0, abs=1e-5)  # no global term
    assert scores["text"].item() == pytest.approx(0.5 * 1 + 0.5 * 0.4, abs=1e-5)
    assert scoring.fuse_image_scores(scores, config.image_weights).item() == pytest.approx(image, abs=1e-5)


def test_layers_with_different_grids_average_after_upsampling():
    kernel = scoring.gaussian_kernel(5, 4.0)
    mixed = scoring.average_upsampled([torch.full((2, 4, 4), 1.0), torch.full((2, 2, 2), 3.0)], 16, kernel)
    assert mixed.shape == (2, 16, 16)
    assert mixed[:, 2:-2, 2:-2] == pytest.approx(torch.full((2, 12, 12), 2.0), abs=1e-5)


def test_smoothing_in_two_passes_equals_the_2d_convolution():
    """A Gaussian kernel runs as two 1-D passes (the outer product of its sums); any other in 2-D."""
    import torch.nn.functional as F

    maps = torch.rand(3, 23, 17, generator=torch.Generator().manual_seed(0))
    for kernel in (scoring.gaussian_kernel(5, 4.0), scoring.gaussian_kernel(3, 1.0),
                   torch.rand(5, 5, generator=torch.Generator().manual_seed(1))):
        expected = F.conv2d(maps[:, None], kernel[None, None], padding=kernel.shape[-1] // 2)[:, 0]
        torch.testing.assert_close(scoring.gaussian_smooth(maps, kernel), expected, atol=1e-6, rtol=0)
