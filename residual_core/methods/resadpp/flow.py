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
import torch.nn.functional as F
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


def position_table(dim: int, height: int, width: int, device: torch.device | str) -> Tensor:
    """Positional condition of each grid position [H*W, dim] in (h, w) order."""
    return position_encoding(dim, height, width).to(device).permute(1, 2, 0).reshape(height * width, dim)


def position_rows(dim: int, batch: int, height: int, width: int, device: torch.device | str) -> Tensor:
    """Positional condition per flattened position [B*H*W, dim] in (b, h, w) order."""
    table = position_table(dim, height, width, device)
    return table.unsqueeze(0).expand(batch, -1, -1).reshape(-1, dim)


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

    @torch.no_grad()
    def condition_terms(self, table: Tensor) -> list[Tensor]:
        """Per coupling block, W_c c + b of the first subnet layer for each row c of `table` [P, cond_dim]:
        what `forward_grids` adds to every grid (compute once per grid size, reuse for every chunk)."""
        if self.cond_dim is None or table.shape[-1] != self.cond_dim:
            raise ValueError(f"condition terms need a conditional flow and a table [P, {self.cond_dim}]")
        terms = []
        for block in self.inn.module_list:
            _check_plain_block(block)
            first = block.subnet[0]
            terms.append(F.linear(table, first.weight[:, block.splits[0]:], first.bias))
        return terms

    @torch.no_grad()
    def forward_grids(self, x: Tensor, terms: list[Tensor]) -> tuple[Tensor, Tensor]:
        """`forward(x, table rows repeated per grid)` for inference, given `condition_terms(table)`: x holds
        whole grids, [n * P, D] in (grid, position) order (no gradient; equal up to float summation order).
        The table may be any run of a grid's positions (the terms' rows sliced alike): x then holds n copies
        of that run.

        Why: the first subnet layer sees [x1, condition] with a 256-wide positional condition against
        12-56 feature channels, and every image of a batch repeats the same positions; splitting the
        layer's weight, W [x1; c] + b = W_x x1 + (W_c c + b), leaves per row only the narrow W_x part. The
        term is copied into one reused activation buffer and the GEMM accumulates onto it (a fresh
        multi-megabyte tensor per block cost page faults): on a CPU bit for bit the product, then the add.
        """
        positions = terms[0].shape[0] if terms else 0
        if len(terms) != len(self.inn.module_list) or not positions or x.shape[0] % positions:
            raise ValueError(f"need a condition term per coupling block and whole grids of {positions} rows")
        grids = x.shape[0] // positions
        widest = max(term.shape[1] for term in terms)
        buffer = x.new_empty(x.shape[0] * widest)  # one hidden buffer for every block: no page faults
        log_jac = x.new_zeros(x.shape[0])
        for block, term in zip(self.inn.module_list, terms, strict=True):
            first, _, second = block.subnet
            width = block.splits[0]
            x1, x2 = x[:, :width], x[:, width:]
            hidden = buffer[: x.shape[0] * term.shape[1]].view(grids, positions, term.shape[1])
            hidden.copy_(term.expand_as(hidden))
            # W_x x1 accumulated onto the per-position term in one GEMM (the same sums as mm, then add)
            hidden = hidden.view(x.shape[0], -1).addmm_(x1, first.weight[:, :width].T).relu_()
            coefficients = torch.addmm(second.bias, hidden, second.weight.T).mul_(0.1)
            channels = x2.shape[1]
            log_scale = torch.tanh(coefficients[:, :channels]).mul_(block.clamp)  # FrEIA's _affine
            x2 = x2 * torch.exp(log_scale) + coefficients[:, channels:]
            scale = block.global_scale_activation(block.global_scale)  # FrEIA's _permute
            x = F.linear(torch.cat((x1, x2), dim=1) * scale + block.global_offset, block.w_perm)
            log_jac = log_jac + log_scale.sum(dim=1) + torch.log(scale).sum()
        return x, log_jac

    def _cond(self, cond: Tensor | None) -> list[Tensor] | None:
        if self.cond_dim is None:
            return None
        if cond is None or cond.shape[-1] != self.cond_dim:
            raise ValueError(f"conditional flow needs a condition of width {self.cond_dim}")
        return [cond]


def _check_plain_block(block: nn.Module) -> None:
    """`forward_grids` restates the AllInOneBlock configuration built above and nothing else."""
    subnet = getattr(block, "subnet", None)
    plain = (
        isinstance(block, Fm.AllInOneBlock)
        and not block.householder
        and not block.reverse_pre_permute
        and not block.GIN
        and block.input_rank == 0
        and isinstance(subnet, nn.Sequential)
        and len(subnet) == 3
        and isinstance(subnet[0], nn.Linear)
        and isinstance(subnet[1], nn.ReLU)
        and isinstance(subnet[2], nn.Linear)
    )
    if not plain:
        raise ValueError("forward_grids supports the flows built by LevelFlow only")
