"""Spatial penalties of Res2CLIP's `_compute_penalty`, written on explicit grid positions.

The authors build an [L, k_shot*L] matrix for a square H x H grid. Here a penalty is a function of
query positions and reference positions (row, col) that broadcast against each other, so the same
formulas serve the dense matrix ([L,1,2] vs [1,N,2]), FAISS candidates ([R,1,2] vs [R,C,2]) and
subsampled (coreset) banks. On a square grid the values equal the authors' exactly; on a H x W grid
the centre is ((H-1)/2, (W-1)/2) and the normalising radii are the corner distances.
All penalties are >= 0 for gamma >= 0 and scale linearly with gamma.
"""

from __future__ import annotations

import math

import torch

RADIAL_MARGIN = 2.0  # "radial_margin" / "euc_new" dead zone, in patches
LAPLACE_SIGMA = 1.0  # "radial_laplace"
POLAR_SIGMA_R = 1.0  # "polar" radial Gaussian width
POLAR_SIGMA_THETA = math.pi / 4.0  # "polar" angular Gaussian width
POLAR_ANGLE_WEIGHT = 0.1  # "polar" weight of the angular term


def grid_positions(grid: tuple[int, int], *, device: torch.device | str = "cpu") -> torch.Tensor:
    """[H*W, 2] (row, col) positions in row-major order (the patch-token order)."""
    height, width = grid
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([rows, cols], dim=1)


def spatial_penalty(
    kind: str,
    gamma: float,
    query_positions: torch.Tensor,
    reference_positions: torch.Tensor,
    grid: tuple[int, int],
) -> torch.Tensor | None:
    """Penalty between broadcastable (row, col) position tensors [..., 2]; None when `kind` is ""."""
    if not kind:
        return None
    height, width = grid
    centre = torch.tensor([(height - 1) / 2.0, (width - 1) / 2.0], device=query_positions.device)
    q = query_positions.float() - centre
    r = reference_positions.float().to(q.device) - centre
    q_radius, r_radius = q.norm(dim=-1), r.norm(dim=-1)
    radial = (q_radius - r_radius).abs()
    max_radius = float(centre.norm())
    max_euclidean = math.hypot(height - 1, width - 1)

    if kind == "local":
        return gamma * _euclidean(q, r)
    if kind == "radial":
        return gamma * radial
    if kind == "radial_new":
        return gamma * radial / (max_radius + 1e-6)
    if kind == "radial_margin":
        return gamma * (radial - RADIAL_MARGIN).clamp_min(0.0)
    if kind == "radial_laplace":
        return gamma * (1.0 - torch.exp(-radial / LAPLACE_SIGMA))
    if kind == "polar_linear":
        return gamma * (radial + _angle_distance(q, r))
    if kind == "polar":
        angle = _angle_distance(q, r)
        p_radius = gamma * (1.0 - torch.exp(-(radial**2) / (2 * POLAR_SIGMA_R**2)))
        p_angle = gamma * POLAR_ANGLE_WEIGHT * (1.0 - torch.exp(-(angle**2) / (2 * POLAR_SIGMA_THETA**2)))
        return p_radius + p_angle
    if kind == "radial_euc":
        return gamma * (radial / (max_radius + 1e-6) + _euclidean(q, r) / (max_euclidean + 1e-6))
    if kind == "euc_new":
        return gamma * (1.0 - torch.exp(-(_euclidean(q, r) - RADIAL_MARGIN).clamp_min(0.0)))
    raise ValueError(f"unknown spatial penalty {kind!r}")


def _euclidean(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    return (q - r).norm(dim=-1)


def _angle_distance(q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Shortest angular distance of the polar angles atan2(y, x) around the grid centre."""
    q_angle = torch.atan2(q[..., 0], q[..., 1])
    r_angle = torch.atan2(r[..., 0], r[..., 1])
    difference = (q_angle - r_angle).abs()
    return torch.minimum(difference, 2 * math.pi - difference)
