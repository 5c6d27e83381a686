"""Backbone tokens -> per-level feature maps -> ResAD residuals against matched normal references."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from residual_core.matching.resad import matched_reference_maps, residual


def token_maps(patch_tokens: Sequence[Tensor], grids: Sequence[tuple[int, int]]) -> list[Tensor]:
    """[B, H*W, D] per level -> [B, D, H, W] per level (the authors' CNN layout)."""
    maps = []
    for level, (tokens, (h, w)) in enumerate(zip(patch_tokens, grids, strict=True)):
        if tokens.ndim != 3 or tokens.shape[1] != h * w:
            raise ValueError(f"level {level}: tokens {tuple(tokens.shape)} do not fit grid {(h, w)}")
        maps.append(tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w).float())
    return maps


def residual_maps(
    feature_maps: Sequence[Tensor], references: Sequence[Tensor], squared: bool
) -> list[Tensor]:
    """Residual per level: query minus its cosine-nearest raw reference feature (squared if asked).

    feature_maps: per level [B, D, H, W]; references: per level [N, D] raw normal features.
    """
    out = []
    for fmap, ref in zip(feature_maps, references, strict=True):
        matched = matched_reference_maps(fmap, ref.to(device=fmap.device, dtype=fmap.dtype))
        out.append(residual(fmap, matched, squared=squared))
    return out


def grouped_residual_maps(
    feature_maps: Sequence[Tensor], groups: Sequence[tuple[Tensor, Sequence[Tensor]]], squared: bool
) -> list[Tensor]:
    """Residuals for a batch mixing categories: groups = [(row indices, per-level references)]."""
    out = [torch.empty_like(f) for f in feature_maps]
    for rows, references in groups:
        part = residual_maps([f[rows] for f in feature_maps], references, squared)
        for level, values in enumerate(part):
            out[level][rows] = values
    return out
