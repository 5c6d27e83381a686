"""Separable smoothing of anomaly maps [B, H, W]: each 1-D pass as one GEMM with a [side, side] filter matrix.

ResAD++ and PatchCore smooth with scipy's `gaussian_filter` (33 taps at sigma 4, borders reflected),
Res2CLIP with a 5 x 5 Gaussian `Conv2d` (zero padding), which is the outer product of two 1-D filters.
On CPUs the single-channel convolutions were the slow part: a 1-D pass as a product with a banded matrix
(the border folded into the matrix) ran 10x faster for 224 px maps with 33 taps, 3x with 5 taps, and still
2.2x at 1,024 px (RESULTS.md, twelfth pass), although it multiplies side / taps times as often. Past
`MATRIX_FILTER_MAX_SIDE` the convolutions run instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BORDERS = ("reflect", "zeros")  # scipy's 'reflect' (d c b a | a b c d | d c b a); zero padding
MATRIX_FILTER_MAX_SIDE = 1024


def reflect_indices(length: int, radius: int, device: torch.device) -> Tensor:
    """Source index of each of the length + 2 radius positions under scipy's 'reflect' padding, any radius."""
    index = torch.arange(-radius, length + radius, device=device) % (2 * length)
    return torch.where(index >= length, 2 * length - 1 - index, index)


def filter_matrix(length: int, taps: Tensor, border: str) -> Tensor:
    """[length, length] M with (x @ M)[i] = sum_t taps[t] x[i + t - radius] (odd number of taps, centred),
    positions outside [0, length) reflected or zero; a tap reflected onto an index already used adds to it."""
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    radius = taps.shape[0] // 2
    outputs = torch.arange(length, device=taps.device)
    if border == "reflect":
        sources = reflect_indices(length, radius, taps.device).unfold(0, taps.shape[0], 1)  # [length, taps]
        weights = taps.expand_as(sources)
    else:
        sources = outputs[:, None] + torch.arange(-radius, radius + 1, device=taps.device)
        inside = (sources >= 0) & (sources < length)
        weights = torch.where(inside, taps, torch.zeros((), dtype=taps.dtype, device=taps.device))
        sources = sources.clamp(0, length - 1)
    matrix = taps.new_zeros(length, length)
    return matrix.index_put_((sources, outputs[:, None].expand_as(sources)), weights, accumulate=True)


def separable_filter(maps: Tensor, column_taps: Tensor, row_taps: Tensor, border: str) -> Tensor:
    """Correlate each map of [B, H, W] with column_taps (along H) and row_taps (along W), odd lengths."""
    _, h, w = maps.shape
    column_taps = column_taps.to(device=maps.device, dtype=maps.dtype)
    row_taps = row_taps.to(device=maps.device, dtype=maps.dtype)
    if max(h, w) <= MATRIX_FILTER_MAX_SIDE:
        along_rows = filter_matrix(w, row_taps, border)
        same = h == w and torch.equal(column_taps, row_taps)
        along_columns = along_rows if same else filter_matrix(h, column_taps, border)
        return torch.matmul(along_columns.T, maps @ along_rows)
    rows_radius, columns_radius = row_taps.shape[0] // 2, column_taps.shape[0] // 2
    x = maps.unsqueeze(1)
    if border == "reflect":
        x = x[:, :, reflect_indices(h, columns_radius, maps.device)]
        x = x[..., reflect_indices(w, rows_radius, maps.device)]
    else:
        x = F.pad(x, (rows_radius, rows_radius, columns_radius, columns_radius))
    x = F.conv2d(x, column_taps.view(1, 1, -1, 1))
    return F.conv2d(x, row_taps.view(1, 1, 1, -1)).squeeze(1)


def gaussian_blur(maps: Tensor, sigma: float = 4.0, truncate: float = 4.0) -> Tensor:
    """scipy.ndimage.gaussian_filter(map, sigma) per map of [B, H, W] (mode 'reflect', truncate 4)."""
    if sigma <= 0:
        return maps
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=maps.device, dtype=maps.dtype)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = taps / taps.sum()
    return separable_filter(maps, taps, taps, "reflect")
