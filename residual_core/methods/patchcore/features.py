"""PatchCore's locally aware patch features, from backbone tokens or from a bank's raw features.

The reference (`patchcore.py: PatchCore._embed`, `PatchMaker.patchify`, `common.py: Preprocessing`,
`MeanMapper`, `Aggregator`) does, per chosen layer l with feature map [B, C_l, H_l, W_l]:

1. unfold the p x p neighbourhood of every position (stride 1, zero padding (p - 1) / 2): C_l * p * p
   values per position, ordered (channel, row offset, column offset);
2. layers after the first: bilinearly resize (align_corners=False) each of those C_l * p * p maps from
   H_l x W_l to the first layer's grid H_0 x W_0 (the unfolded neighbourhoods are resized, not the raw map);
3. `MeanMapper`: adaptive average pooling (1-D) of the C_l * p * p vector to `pretrain_embed_dimension`;
4. `Aggregator`: stack the layers ([L, pretrain]), flatten layer-major, adaptive average pooling (1-D) to
   `target_embed_dimension`.

All of it is batched torch (no per-patch Python loops); only the reference images of a bank are taken a few
images at a time to bound the memory of the unfolded maps.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from residual_core.methods.base import MethodError


def tokens_to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Batch-first row-major tokens [B, H*W, C] -> feature map [B, C, H, W]."""
    height, width = grid
    if tokens.ndim != 3 or tokens.shape[1] != height * width:
        raise MethodError(f"patchcore: tokens {tuple(tokens.shape)} do not fit the grid {grid}")
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], height, width)


def bank_layer_maps(features: Tensor, positions: Tensor, grid: tuple[int, int], *, layer: int) -> Tensor:
    """A bank layer's raw rows [K*H*W, C] with (row, col) `positions` -> per-reference maps [K, C, H, W].

    `build_bank` stores the K references one after the other, H*W rows each; within a block the rows may
    come in any order, `positions` says where each one sits. A block that is not a full grid (a bank
    subsampled with `coreset_bank`, say) has no 3 x 3 neighbourhoods: MethodError."""
    height, width = grid
    cells = height * width
    count = int(features.shape[0])
    if count == 0 or count % cells:
        raise MethodError(
            f"patchcore: bank layer {layer} holds {count} rows, not whole {height}x{width} grids; PatchCore "
            f"needs every patch of every reference (is the bank subsampled?)")
    refs = count // cells
    positions = positions.to(features.device).long()
    cell = positions[:, 0] * width + positions[:, 1]
    rows, cols = positions[:, 0], positions[:, 1]
    inside = bool(((rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)).all())
    target = torch.arange(refs, device=features.device).repeat_interleave(cells) * cells + cell
    if not inside or not bool((torch.bincount(target, minlength=count) == 1).all()):
        raise MethodError(f"patchcore: bank layer {layer} positions do not tile each reference's "
                          f"{height}x{width} grid exactly once")
    ordered = torch.empty_like(features)
    ordered[target] = features
    return ordered.reshape(refs, height, width, -1).permute(0, 3, 1, 2)


def patch_embeddings(
    maps: Sequence[Tensor], *, patchsize: int, pretrain_dim: int, target_dim: int
) -> tuple[Tensor, tuple[int, int]]:
    """Per-layer maps [B, C_l, H_l, W_l] -> ([B, H_0*W_0, target_dim], (H_0, W_0)); the first map sets
    the grid."""
    if not maps:
        raise MethodError("patchcore: no feature maps to embed")
    batch = maps[0].shape[0]
    grid = (int(maps[0].shape[-2]), int(maps[0].shape[-1]))
    padding = (patchsize - 1) // 2
    pooled_layers = []
    for fmap in maps:
        if fmap.shape[0] != batch:
            raise MethodError("patchcore: feature maps of one batch differ in batch size")
        _, channels, height, width = fmap.shape
        width_vec = channels * patchsize * patchsize
        unfolded = F.unfold(fmap.float(), kernel_size=patchsize, stride=1, padding=padding)
        unfolded = unfolded.reshape(batch, width_vec, height, width)
        if (height, width) != grid:
            unfolded = F.interpolate(unfolded, size=grid, mode="bilinear", align_corners=False)
        vectors = unfolded.flatten(2).transpose(1, 2).reshape(-1, 1, width_vec)  # [B*L0, 1, C*p*p]
        pooled_layers.append(F.adaptive_avg_pool1d(vectors, pretrain_dim).squeeze(1))  # MeanMapper
    stacked = torch.stack(pooled_layers, dim=1)  # [B*L0, layers, pretrain] (Preprocessing)
    aggregated = F.adaptive_avg_pool1d(stacked.reshape(stacked.shape[0], 1, -1), target_dim)  # Aggregator
    return aggregated.reshape(batch, grid[0] * grid[1], target_dim), grid
