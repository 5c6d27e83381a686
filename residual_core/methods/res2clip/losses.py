"""Res2CLIP training losses (authors' `utils/loss.py`).

Patch scores [B, L] on an (h, w) grid are upsampled bilinearly to the mask size [B, 1, S, S]
before the ranking. Each pixel loss accepts `valid` [B] bool: images whose pixels may enter the
loss (anomalous images without a mask are excluded; with every image valid the formulas are
exactly the authors').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-6  # their clamp(min=1e-6) on the pixel/image counts


def _to_mask_size(values: Tensor, grid: tuple[int, int], masks: Tensor) -> Tensor:
    batch = values.shape[0]
    maps = values.reshape(batch, 1, *grid)
    return F.interpolate(maps, size=masks.shape[-2:], mode="bilinear")


def _weights(masks: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per-pixel weights of the normal and anomalous terms: (1 - m) v and m v."""
    v = torch.ones(masks.shape[0], device=masks.device) if valid is None else valid.to(masks.dtype)
    v = v.view(-1, 1, 1, 1)
    return (1 - masks) * v, masks * v


def _ranking(score_map: Tensor, margin: Tensor | float, masks: Tensor, valid: Tensor | None) -> Tensor:
    """mean over normal pixels of relu(s) + mean over anomalous pixels of relu(margin - s)."""
    w_normal, w_anomalous = _weights(masks, valid)
    loss_normal = (F.relu(score_map) * w_normal).sum() / w_normal.sum().clamp(min=_EPS)
    loss_anomalous = (F.relu(margin - score_map) * w_anomalous).sum() / w_anomalous.sum().clamp(min=_EPS)
    return loss_normal + loss_anomalous


def fixed_margin_ranking(
    scores: Tensor, grid: tuple[int, int], masks: Tensor, margin: float, valid: Tensor | None = None
) -> Tensor:
    """`loss_fixed_margin_ranking`: patch scores below 0 on normal pixels, above `margin` on defects."""
    return _ranking(_to_mask_size(scores, grid, masks), margin, masks, valid)


def dynamic_margin_ranking(
    scores: Tensor,
    base_residual: Tensor,
    grid: tuple[int, int],
    masks: Tensor,
    tau: float,
    valid: Tensor | None = None,
) -> Tensor:
    """`loss_dynamic_margin_ranking`: the margin is tau * ||R_v|| of the un-adapted residual."""
    margin = _to_mask_size(base_residual.detach().norm(p=2, dim=-1), grid, masks) * tau
    return _ranking(_to_mask_size(scores, grid, masks), margin, masks, valid)


def magnitude_control(
    adapted: Tensor, original: Tensor, grid: tuple[int, int], masks: Tensor, valid: Tensor | None = None
) -> Tensor:
    """`loss_magnitude_control` (l_n + l_a): shrink ||R~_v|| on normal pixels, keep ||R_v|| on defects."""
    w_normal, w_anomalous = _weights(masks, valid)
    adapted_mag = _to_mask_size(adapted.norm(p=2, dim=-1), grid, masks)
    original_mag = _to_mask_size(original.detach().norm(p=2, dim=-1), grid, masks)
    loss_normal = (adapted_mag * w_normal).sum() / w_normal.sum().clamp(min=_EPS)
    loss_anomalous = ((adapted_mag - original_mag).abs() * w_anomalous).sum() / w_anomalous.sum().clamp(
        min=_EPS
    )
    return loss_normal + loss_anomalous


def fixed_margin_ranking_global(scores: Tensor, labels: Tensor, margin: float) -> Tensor:
    """`loss_fixed_margin_ranking_global` on image scores [B] with labels [B] in {0, 1}."""
    labels = labels.to(scores.dtype)
    loss_normal = (F.relu(scores) * (1 - labels)).sum() / (1 - labels).sum().clamp(min=_EPS)
    loss_anomalous = (F.relu(margin - scores) * labels).sum() / labels.sum().clamp(min=_EPS)
    return loss_normal + loss_anomalous


def dynamic_margin_ranking_global(
    scores: Tensor, base_residual: Tensor, labels: Tensor, tau: float
) -> Tensor:
    """`loss_dynamic_margin_ranking_global`: margin tau * ||R_v_cls|| per image."""
    labels = labels.to(scores.dtype)
    margin = tau * base_residual.detach().norm(p=2, dim=-1)
    loss_normal = (F.relu(scores) * (1 - labels)).sum() / (1 - labels).sum().clamp(min=_EPS)
    loss_anomalous = (F.relu(margin - scores) * labels).sum() / labels.sum().clamp(min=_EPS)
    return loss_normal + loss_anomalous


def direction_regulariser(adapted: Tensor, original: Tensor) -> Tensor:
    """mean(1 - cos(R~_t, R_t)): keeps an adapted text residual near the frozen one."""
    return (1.0 - F.cosine_similarity(adapted, original.detach(), dim=-1)).mean()


def magnitude_regulariser(adapted: Tensor, original: Tensor) -> Tensor:
    """L1(||R~||, ||R||): keeps an adapted visual residual's magnitude (their F.l1_loss, mean)."""
    return F.l1_loss(adapted.norm(dim=-1), original.detach().norm(dim=-1))
