"""Conditional normalising flows per level with sinusoidal positional conditioning (models/fc_flow.py).

Built from FrEIA's AllInOneBlock exactly as the authors configure it: fully connected subnet
d -> 2d -> out, affine clamping 1.9, SOFTPLUS global affine, soft (SO(N)) permutations.
"""

from __future__ import annotations

import math

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import Tensor, nn


def position_encoding(dim: int, height: int, width: int) -> Tensor:
    """[dim, H, W] 2-D sin/cos encoding (models/modules.get_position_encoding).

    The first dim/2 channels encode the column (sin at even, cos at odd), the rest the row, with
    frequencies exp(-2k * ln(1e4) / (dim/2)).
    """
    if dim % 4 != 0:
        raise ValueError(f"sin/cos positional encoding needs a dimension divisible by 4, got {dim}")
    half = dim // 2
    freq = torch.exp(torch.arange(0.0, half, 2) * -(math.log(1e4) / half))  # [half/2]
    cols = torch.arange(0.0, width).unsqueeze(1) * freq  # [W, half/2]
    rows = torch.arange(0.0, height).unsqueeze(1) * freq  # [H, half/2]
    encoding = torch.zeros(dim, height, width)
    encoding[0:half:2] = torch.sin(cols).T.unsqueeze(1).expand(-1, height, -1)
    encoding[1:half:2] = torch.cos(cols).T.unsqueeze(1).expand(-1, height, -1)
    encoding[half::2] = torch.sin(rows).T.unsqueeze(2).expand(-1, -1, width)
    encoding[half + 1 :: 2] = torch.cos(rows).T.unsqueeze(2).expand(-1, -1, width)
    return encoding


def position_rows(dim: int, batch: int, height: int, width: int, device: torch.device | str) -> Tensor:
    """Positional condition per flattened position [B*H*W, dim] in (b, h, w) order."""
    encoding = position_encoding(dim, height, width).to(device)
    return encoding.permute(1, 2, 0).reshape(1, height * width, dim).expand(batch, -1, -1).reshape(-1, dim)


def _subnet_fc(dims_in: int, dims_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dims_in, 2 * dims_in), nn.ReLU(), nn.Linear(2 * dims_in, dims_out))


class LevelFlow(nn.Module):
    """Flow for one feature level: [N, D] (+ condition [N, P]) -> (z [N, D], log|det J| [N])."""

    def __init__(self, dim: int, coupling_layers: int, clamp_alpha: float, cond_dim: int | None,
                 seed: int = 0) -> None:
        super().__init__()
        self.cond_dim = cond_dim
        # FrEIA draws the soft permutations from numpy's global RNG: make them reproducible
        state = np.random.get_state()
        np.random.seed(seed)
        try:
            inn = Ff.SequenceINN(dim)
            extra = {} if cond_dim is None else {"cond": 0, "cond_shape": (cond_dim,)}
            for _ in range(coupling_layers):
                inn.append(Fm.AllInOneBlock, subnet_constructor=_subnet_fc, affine_clamping=clamp_alpha,
                           global_affine_type="SOFTPLUS", permute_soft=True, **extra)
        finally:
            np.random.set_state(state)
        self.inn = inn

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inn(x, c=self._cond(cond))

    def inverse(self, z: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.inn(z, c=self._cond(cond), rev=True)

    def _cond(self, cond: Tensor | None) -> list[Tensor] | None:
        if self.cond_dim is None:
            return None
        if cond is None or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"conditional flow needs a condition of width {self.cond_dim}")
        return [cond]
