"""Map aggregation, smoothing, fusion and image scores (authors' `test.py` and `utils/metrics.py`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from residual_core.methods.filters import separable_filter
from residual_core.methods.res2clip.config import BranchWeights

# How far a kernel may be from the outer product of its sums and still be filtered in two 1-D passes: a
# float32 Gaussian [5, 5] is one to 4e-9.
SEPARABLE_TOLERANCE = 1e-7


def gaussian_kernel(kernel_size: int = 5, sigma: float = 4.0) -> Tensor:
    """Normalised 2-D Gaussian [k, k] centred at (k-1)/2 (`get_gaussian_kernel`)."""
    coords = torch.arange(kernel_size, dtype=torch.float32)
    centre = (kernel_size - 1) / 2.0
    squared = (coords[None, :] - centre) ** 2 + (coords[:, None] - centre) ** 2
    kernel = torch.exp(-squared / (2.0 * sigma**2)) / (2.0 * math.pi * sigma**2)
    return kernel / kernel.sum()


def gaussian_smooth(maps: Tensor, kernel: Tensor) -> Tensor:
    """Convolve [B, H, W] maps with `kernel`, zero padding k//2 (as their `nn.Conv2d` filter).

    A Gaussian kernel is the outer product of its row and column sums over its total: then two 1-D passes
    (`filters.separable_filter`, 3x faster on CPUs), equal up to float rounding; any other kernel in 2-D."""
    kernel = kernel.to(device=maps.device, dtype=maps.dtype)
    columns, rows = kernel.sum(dim=1), kernel.sum(dim=0)
    separable = torch.outer(columns, rows) / kernel.sum()
    square_odd = kernel.shape[0] == kernel.shape[1] and kernel.shape[0] % 2 == 1
    if square_odd and torch.allclose(separable, kernel, rtol=0, atol=SEPARABLE_TOLERANCE):
        return separable_filter(maps, columns / columns.sum(), rows / rows.sum(), "zeros")
    return F.conv2d(maps[:, None], kernel[None, None], padding=kernel.shape[-1] // 2)[:, 0]


def average_upsampled(layer_maps: list[Tensor], image_size: int, kernel: Tensor) -> Tensor:
    """Mean of per-layer [B, h_l, w_l] maps upsampled bilinearly to [B, S, S], then smoothed.

    The authors average the layer maps and then upsample; bilinear upsampling is linear, so
    upsampling each layer first gives the same map and also allows layers with different grids (CNNs).
    """
    if not layer_maps:
        raise ValueError("average_upsampled: no layer maps")
    size = (image_size, image_size)
    if all(m.shape == layer_maps[0].shape for m in layer_maps):
        mean = torch.stack(layer_maps).mean(dim=0)
        upsampled = F.interpolate(mean[:, None], size=size, mode="bilinear")[:, 0]
    else:
        upsampled = torch.stack(
            [F.interpolate(m[:, None], size=size, mode="bilinear")[:, 0] for m in layer_maps]
        ).mean(dim=0)
    return gaussian_smooth(upsampled, kernel)


def top_fraction_mean(maps: Tensor, fraction: float = 0.01) -> Tensor:
    """Mean of the largest max(1, int(N * fraction)) values of each [B, ...] map (`top1pct`)."""
    flat = maps.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(dim=1)


def fuse_pixel_maps(branch_maps: dict[str, Tensor], weights: BranchWeights, kernel: Tensor) -> Tensor:
    """M = sum_b w_b M_b over the branches that ran, then smoothed once more (their second pass)."""
    fused = sum(weights.get(name) * m for name, m in branch_maps.items())
    return gaussian_smooth(fused, kernel)


def branch_image_score(
    branch_map: Tensor, global_score: Tensor | None, fraction: float, share: float
) -> Tensor:
    """(1 - share) * top-fraction mean of the map + share * global score (their 0.5 / 0.5)."""
    local = top_fraction_mean(branch_map, fraction)
    if global_score is None:
        return local
    return (1.0 - share) * local + share * global_score


def fuse_image_scores(branch_scores: dict[str, Tensor], weights: BranchWeights) -> Tensor:
    """s = sum_b w_b s_b over the branches that ran."""
    return sum(weights.get(name) * s for name, s in branch_scores.items())
