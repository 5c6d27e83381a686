"""Res2CLIP adapters (authors' `models/adapter.py`).

`ResidualAdapter`: pre-norm bottleneck with a zero-initialised up-projection, for the text
residuals and the global visual residual. `MultiScaleConvAdapter`: per-layer adapter for patch
residuals mixing a depthwise 3x3 and a dilated depthwise 3x3 over the patch grid. Both start as
the identity (zero-initialised up-projection). Parameter names match the authors' modules so
that their released state dicts load unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _bottleneck(dim: int, reduction: int) -> int:
    if dim < 1 or reduction < 1:
        raise ValueError(f"adapter: dim ({dim}) and reduction ({reduction}) must be positive")
    return max(1, dim // reduction)


class ResidualAdapter(nn.Module):
    """x + W_up GELU(W_down LN(x)) on [..., D] vectors; bias-free linears as the authors."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = _bottleneck(dim, reduction)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class MultiScaleConvAdapter(nn.Module):
    """x + W_up ReLU(W_blend LN([z, dw3x3(z), dw3x3_dil2(z)])), z = ReLU(W_down LN(x)), on [B, H*W, D]."""

    def __init__(self, dim: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = _bottleneck(dim, reduction)
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, hidden, bias=False)
        self.act_down = nn.ReLU()
        self.conv_fine = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.conv_coarse = nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2, groups=hidden, bias=False)
        self.internal_norm = nn.LayerNorm(hidden * 3)
        self.blend = nn.Linear(hidden * 3, hidden, bias=False)
        self.act_fuse = nn.ReLU()
        self.up = nn.Linear(hidden, dim, bias=False)
        nn.init.zeros_(self.up.weight)
        nn.init.kaiming_normal_(self.conv_fine.weight, mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.conv_coarse.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        batch, length, _ = x.shape
        height, width = grid
        if height * width != length:
            raise ValueError(f"MultiScaleConvAdapter: grid {grid} does not hold {length} tokens")
        z = self.act_down(self.down(self.norm(x)))  # [B, L, h]
        z_2d = z.transpose(1, 2).reshape(batch, -1, height, width)
        multi = torch.cat([z_2d, self.conv_fine(z_2d), self.conv_coarse(z_2d)], dim=1)
        multi = multi.flatten(2).transpose(1, 2)  # [B, L, 3h]
        fused = self.act_fuse(self.blend(self.internal_norm(multi)))
        return x + self.up(fused)


class Res2ClipAdapters(nn.Module):
    """The adapters of the fine-tuned mode, named as the authors' checkpoint groups.

    vis_adapters[l] (A_{v,l}) per visual layer, res_vis_local_adapters[l] (A^res_{v,l}) per residual
    layer, res_vis_global_adapter (A^res_{v,cls}), res_text_adapter (A^res_t), text_adapter (A_t).
    Only the adapters of branches that run are built.
    """

    def __init__(
        self,
        branches: tuple[str, ...],
        visual_layers: tuple[int, ...],
        residual_layers: tuple[int, ...],
        token_dims: dict[int, int],
        embed_dim: int | None,
        reduction: int = 4,
    ) -> None:
        super().__init__()
        self.vis_adapters = nn.ModuleDict()
        self.res_vis_local_adapters = nn.ModuleDict()
        self.res_vis_global_adapter: ResidualAdapter | None = None
        self.res_text_adapter: ResidualAdapter | None = None
        self.text_adapter: ResidualAdapter | None = None
        if "visual" in branches:
            for layer in visual_layers:
                self.vis_adapters[str(layer)] = MultiScaleConvAdapter(token_dims[layer], reduction)
        if "residual" in branches or "text" in branches:
            if embed_dim is None:
                raise ValueError("text and residual adapters need the embedding dimension")
        if "residual" in branches:
            for layer in residual_layers:
                self.res_vis_local_adapters[str(layer)] = MultiScaleConvAdapter(token_dims[layer], reduction)
            self.res_vis_global_adapter = ResidualAdapter(embed_dim, reduction)
            self.res_text_adapter = ResidualAdapter(embed_dim, reduction)
        if "text" in branches:
            self.text_adapter = ResidualAdapter(embed_dim, reduction)

    def groups(self) -> dict[str, nn.Module]:
        """Non-empty adapter groups by their checkpoint name."""
        names = (
            "vis_adapters",
            "res_vis_local_adapters",
            "res_vis_global_adapter",
            "res_text_adapter",
            "text_adapter",
        )
        groups = {name: getattr(self, name) for name in names}
        return {
            name: module
            for name, module in groups.items()
            if module is not None and len(list(module.parameters())) > 0
        }
