"""Moving average of the normal log-likelihood boundary per level (utils.BoundaryAverager)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BoundaryAverager(nn.Module):
    """b_l <- momentum * b_l + (1 - momentum) * b_new, starting from 0 (kept as a buffer for checkpoints)."""

    def __init__(self, num_levels: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("boundaries", torch.zeros(num_levels))

    def update(self, level: int, boundary: Tensor | None) -> None:
        if boundary is None:  # no normal positions in this sub-batch
            return
        value = self.boundaries[level] * self.momentum + (1 - self.momentum) * boundary.detach()
        self.boundaries[level] = value

    def get(self, level: int) -> Tensor:
        return self.boundaries[level]
