"""ResAD++ map merging and smoothing (validate.py) on small hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from residual_core.methods.resadpp.scoring import (
    boundary_anomaly_map,
    gaussian_blur,
    image_scores,
    likelihood_anomaly_map,
    upsample,
)


@pytest.mark.parametrize("shape", [(2, 40, 37), (1, 7, 5)])
def test_gaussian_blur_matches_scipy(shape):
    maps = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = np.stack([gaussian_filter(m, sigma=4) for m in maps.numpy()])
    assert np.abs(gaussian_blur(maps, 4.0).numpy() - expected).max() < 1e-12


def test_likelihood_map_sums_levels_and_flips():
    level0 = torch.full((1, 2, 2), -1.0)
    level1 = torch.full((1, 1, 1), 0.5)
    offsets = torch.tensor([0.0, 0.5])
    out = likelihood_anomaly_map([level0, level1], offsets, size=4, sigma=0.0)
    assert out.shape == (1, 4, 4)
    assert torch.allclose(out, torch.full((1, 4, 4), 2 - (math.exp(-1.0) + 1.0)))


def test_boundary_map_is_level_mean():
    a = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]])
    b = torch.full((1, 1, 1), 0.5)
    out = boundary_anomaly_map([a, b], size=2, sigma=0.0)
    assert torch.allclose(out, (a + 0.5) / 2)


def test_upsample_align_corners_and_image_score():
    up = upsample(torch.tensor([[[0.0, 1.0]]]).expand(1, 2, 2), 3)
    assert up[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])  # align_corners=True keeps the end values
    maps = torch.tensor([[[0.1, 0.9], [0.3, 0.2]], [[0.0, 0.0], [0.4, 0.0]]])
    assert image_scores(maps).tolist() == pytest.approx([0.9, 0.4])
