"""Feature constraintors that map residuals into a hypersphere (models/modules.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ConvBnAct(nn.Module):
    """3x3 conv (padding 1) -> BatchNorm -> ReLU, channels unchanged (modules.ConvBnAct)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.bn(self.conv(x)))


def _make_divisible(value: float, divisor: int = 8) -> int:
    """timm's make_divisible with round_limit=0 (no 90 % floor)."""
    return max(divisor, int(value + divisor / 2) // divisor * divisor)


class TokenSqueezeExcite(nn.Module):
    """SE gate over tokens [B, L, C]: mean over L, fc-ReLU-fc, sigmoid (modules.SEModule defaults)."""

    def __init__(self, channels: int, reduction: float = 1.0 / 16) -> None:
        super().__init__()
        hidden = _make_divisible(channels * reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean(dim=1, keepdim=True))))
        return x * torch.sigmoid(gate)


class MlpSeProjector(nn.Module):
    """Per-position MLP C -> 4C (SE gate) -> GELU -> C (modules.OrthogonalProjector, with_attn=True)."""

    def __init__(self, channels: int, expansion: int = 4) -> None:
        super().__init__()
        hidden = channels * expansion
        self.fc1 = nn.Linear(channels, hidden)
        self.se = TokenSqueezeExcite(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        tokens = self.fc2(self.act(self.se(self.fc1(tokens))))
        return tokens.permute(0, 2, 1).reshape(b, c, h, w)


def _identity(channels: int) -> nn.Module:
    """The "none" constraintor (ablation): residuals pass unchanged, nothing to train."""
    return nn.Identity()


class MultiLevelConstraintor(nn.Module):
    """One independent projector per feature level (MultiScaleConv / MultiScaleOrthogonalProjector)."""

    def __init__(self, channels: Sequence[int], kind: str = "conv") -> None:
        super().__init__()
        block = {"conv": ConvBnAct, "mlp_se": MlpSeProjector, "none": _identity}[kind]
        self.levels = nn.ModuleList(block(c) for c in channels)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """features: per level [B, C_l, H_l, W_l] -> same shapes."""
        if len(features) != len(self.levels):
            raise ValueError(f"constraintor has {len(self.levels)} levels, got {len(features)} feature maps")
        return [proj(x) for proj, x in zip(self.levels, features, strict=True)]
