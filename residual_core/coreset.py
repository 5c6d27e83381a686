"""Greedy k-center coreset (the PatchCore subsampler) with O(N) extra memory.

Each step picks the point farthest from the points chosen so far. Only one [N] vector of current
minimum squared distances is kept; distances to the newest centre come from one matrix-vector product
(|x|^2 - 2 x.c + |c|^2), so no [N, N] or [N, D] temporary is ever built beyond the input itself.
"""

from __future__ import annotations

import torch


def greedy_k_center(
    features: torch.Tensor,
    n_select: int,
    *,
    seed: int = 0,
    projection_dim: int | None = None,
    chunk_size: int = 262_144,
) -> torch.Tensor:
    """Indices [n_select] (long, on features' device) of a greedy k-center coreset of `features` [N, D].

    The first centre is drawn from `seed`; the rest are deterministic. `projection_dim` optionally
    applies a seeded Gaussian random projection first (PatchCore's speed-up; distances are then
    approximate). `chunk_size` bounds the rows processed at once.
    """
    if features.ndim != 2:
        raise ValueError(f"coreset needs [N, D] features, got shape {tuple(features.shape)}")
    total = features.shape[0]
    if not 1 <= n_select <= total:
        raise ValueError(f"coreset size must be in [1, {total}], got {n_select}")
    generator = torch.Generator().manual_seed(seed)
    points = features.float()
    if projection_dim is not None and projection_dim < points.shape[1]:
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = _chunked_matmul(points, projection.to(points.device), chunk_size)
    squared_norms = torch.cat([(chunk * chunk).sum(dim=1) for chunk in points.split(chunk_size)])

    selected = torch.empty(n_select, dtype=torch.long, device=points.device)
    current = int(torch.randint(total, (1,), generator=generator))
    min_distance = torch.full((total,), float("inf"), device=points.device)
    for step in range(n_select):
        selected[step] = current
        centre = points[current]
        distance = squared_norms - 2.0 * _chunked_matvec(points, centre, chunk_size) + squared_norms[current]
        torch.minimum(min_distance, distance.clamp_min_(0.0), out=min_distance)
        min_distance[current] = -1.0  # never pick a chosen point again (duplicates have distance 0)
        current = int(torch.argmax(min_distance))
    return selected


def coreset_size(total: int, *, fraction: float | None = None, size: int | None = None) -> int:
    """Resolve a coreset size from an absolute `size` or a `fraction` of `total` (at least 1)."""
    if (fraction is None) == (size is None):
        raise ValueError("give exactly one of fraction or size for the coreset")
    if size is not None:
        return min(total, size)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"coreset fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(total * fraction)))


def _chunked_matvec(points: torch.Tensor, vector: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return torch.cat([chunk @ vector for chunk in points.split(chunk_size)])


def _chunked_matmul(points: torch.Tensor, matrix: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return torch.cat([chunk @ matrix for chunk in points.split(chunk_size)])
