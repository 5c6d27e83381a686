"""Anomaly maps from per-level flow outputs, merged as validate.py does, and smoothing."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _symmetric_indices(length: int, radius: int, device: torch.device) -> Tensor:
    """Indices of scipy's 'reflect' padding (d c b a | a b c d | d c b a), any radius."""
    idx = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(idx >= length, 2 * length - 1 - idx, idx)


def gaussian_blur(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) per map of [B, H, W] (mode 'reflect', truncate 4)."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    _, h, w = maps.shape
    x = maps[:, _symmetric_indices(h, radius, maps.device)][:, :, _symmetric_indices(w, radius, maps.device)]
    x = x.unsqueeze(1)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    return x.squeeze(1)


def upsample(maps: Tensor, size: int) -> Tensor:
    """[B, h, w] -> [B, size, size], bilinear with align_corners=True (validate.py)."""
    return F.interpolate(maps.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=True).squeeze(1)


def likelihood_anomaly_map(
    logp_maps: Sequence[Tensor], logp_offsets: Tensor, size: int, sigma: float
) -> Tensor:
    """validate.convert_to_anomaly_scores: sum_l up(exp(logp_l - m_l)), then (L - sum), smoothed.

    The authors subtract each level's maximum over the whole test set (m_l) and flip with the set's
    maximum; here m_l is a fixed per-level constant (the maximum normal log-likelihood seen in the last
    training epoch) and the flip uses the constant L, so scores do not depend on the batch.
    """
    normal = sum(upsample(torch.exp(lp - logp_offsets[i]), size) for i, lp in enumerate(logp_maps))
    return gaussian_blur(len(logp_maps) - normal, sigma)


def boundary_anomaly_map(anomaly_prob_maps: Sequence[Tensor], size: int, sigma: float) -> Tensor:
    """validate.aggregate_anomaly_scores: mean over levels of up(softmax([logp_n, logp_a])[1]), smoothed."""
    mean = sum(upsample(p, size) for p in anomaly_prob_maps) / len(anomaly_prob_maps)
    return gaussian_blur(mean, sigma)


def image_scores(anomaly_map: Tensor) -> Tensor:
    """Image score = maximum of the map (calculate_metrics with only_max_value=True: top-1 mean)."""
    return anomaly_map.flatten(1).max(dim=1).values
