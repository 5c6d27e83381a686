"""ResAD++ losses, formula for formula after the authors' ``losses/`` and ``models/utils.py``.

Position masks are 1-D float tensors: 0 normal, 1 anomalous (callers drop unknown positions first).
Empty selections contribute a zero (the authors' ``loss = 0`` branches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

GAUSS_CONST = -0.5 * math.log(2 * math.pi)  # _GCONST_ = ln(1 / sqrt(2 pi))
R_MAX_DEFAULT = 0.4  # r_max when a batch has no anomalies
R_MIN_RATIO = 0.99  # r_min = 0.99 * r_max
R_MAX_ANOMALY_RATIO = 0.9  # r_max = min(0.9 * min anomalous radius, 0.4)
ANOMALY_PUSH_MARGIN = 0.1  # anomalous radii pushed beyond r_max + 0.1
FOCAL_GAMMA = 2.0
FOCAL_SMOOTH = 1e-5


def hypersphere_radius(features: Tensor) -> Tensor:
    """A = sqrt(||e||_2 + 1) - 1 per row of [N, D] (calculate_log_barrier_bi_occ_loss)."""
    return torch.sqrt(features.norm(dim=1) + 1) - 1


def log_barrier(excess: Tensor) -> Tensor:
    """mean(-log sigmoid(-x) * stop_grad(exp(x))) over violations x > 0; 0 when there are none."""
    if excess.numel() == 0:
        return excess.new_zeros(())
    return torch.mean(-F.logsigmoid(-excess) * torch.exp(excess).detach())


@dataclass
class OccLoss:
    total: Tensor
    normal: Tensor
    anomaly: Tensor
    r_min: float
    r_max: float


def log_barrier_bi_occ_loss(features: Tensor, mask: Tensor, target: Tensor | None = None) -> OccLoss:
    """Log-barrier bidirectional contraction OCC loss (losses/loss.py calculate_log_barrier_bi_occ_loss).

    features: constrained residuals [N, D]; target: the residuals before the constraintor [N, D].
    Normal radii are pulled into [r_min, r_max]; anomalous features stay close to their targets
    (MSE + cosine "anomaly invariant" term) and their radii are pushed beyond r_max + 0.1.
    """
    radius = hypersphere_radius(features)
    normal, anomalous = mask == 0, mask == 1
    zero = features.new_zeros(())
    if anomalous.any():
        r_max = min(R_MAX_ANOMALY_RATIO * radius[anomalous].min().item(), R_MAX_DEFAULT)
    else:
        r_max = R_MAX_DEFAULT
    r_min = R_MIN_RATIO * r_max

    loss_normal = zero
    if normal.any():
        radius_n = radius[normal]
        loss_normal = log_barrier(radius_n[radius_n > r_max] - r_max) + log_barrier(
            r_min - radius_n[radius_n < r_min]
        )

    loss_anomaly = zero
    if anomalous.any() and target is not None:
        feats_a, target_a = features[anomalous], target[anomalous]
        invariant = F.mse_loss(feats_a, target_a) + torch.mean(1 - F.cosine_similarity(feats_a, target_a))
        push_to = r_max + ANOMALY_PUSH_MARGIN
        radius_a = radius[anomalous]
        loss_anomaly = invariant + log_barrier(push_to - radius_a[radius_a < push_to])
    return OccLoss(loss_normal + loss_anomaly, loss_normal, loss_anomaly, r_min, r_max)


def orthogonal_regularizer(features: Tensor, mask: Tensor, weight: float = 1.0) -> Tensor:
    """weight * mean((F_n^T F_n - I)^2) / 2 on normal rows (calculate_orthogonal_regularizer)."""
    normal = features[mask == 0]
    gram = normal.T @ normal
    eye = torch.eye(features.shape[1], device=features.device, dtype=features.dtype)
    return weight * torch.mean((gram - eye) ** 2) / 2


def gaussian_logp(z: Tensor, log_jac_det: Tensor, center: float = 0.0) -> Tensor:
    """Per-dimension log-likelihood (C*c - 0.5*||z - center||^2 + log|J|) / C.

    center 0: models/utils.get_logp (then / dim); center 1: losses/utils.get_logp_a.
    """
    dim = z.shape[1]
    return (dim * GAUSS_CONST - 0.5 * torch.sum((z - center) ** 2, dim=1) + log_jac_det) / dim


def normal_boundary(logps: Tensor, mask: Tensor, pos_beta: float = 0.05) -> Tensor | None:
    """The int(n_normal * beta)-th smallest normal log-likelihood (losses/utils.get_normal_boundary)."""
    normal = logps[mask == 0]
    if normal.numel() == 0:
        return None
    index = int(normal.numel() * pos_beta)
    return torch.sort(normal).values[index]


def focal_loss(
    probs: Tensor, target: Tensor, gamma: float = FOCAL_GAMMA, smooth: float = FOCAL_SMOOTH
) -> Tensor:
    """Focal loss on class probabilities [N, C] (losses/focal_loss.FocalLoss, alpha=None).

    One-hot targets are clamped to [smooth/(C-1), 1-smooth]; pt = <onehot, p> + smooth;
    loss = mean(-(1 - pt)^gamma * log pt).
    """
    num_class = probs.shape[1]
    one_hot = F.one_hot(target.long().reshape(-1), num_class).to(probs.dtype)
    one_hot = one_hot.clamp(smooth / (num_class - 1), 1.0 - smooth)
    pt = (one_hot * probs).sum(dim=1) + smooth
    return torch.mean(-torch.pow(1 - pt, gamma) * pt.log())


def semi_push_pull_loss(
    logps: Tensor, mask: Tensor, b_normal: Tensor, b_anomaly: Tensor
) -> tuple[Tensor, Tensor]:
    """Boundary-guided semi-push-pull loss (calculate_log_barrier_bg_spp_loss).

    Normal log-likelihoods at or below b_n are pulled up; anomalous ones at or above b_a pushed down.
    """
    zero = logps.new_zeros(())
    normal = logps[mask == 0]
    normal = normal[normal <= b_normal]
    loss_n = torch.mean(-F.logsigmoid(-(b_normal - normal))) if normal.numel() else zero
    anomalous = logps[mask == 1]
    anomalous = anomalous[anomalous >= b_anomaly]
    loss_a = torch.mean(-F.logsigmoid(-(anomalous - b_anomaly))) if anomalous.numel() else zero
    return loss_n, loss_a


def _item(value: Tensor) -> float:
    return float(value.detach())


def masked_mean(values: Tensor, select: Tensor) -> Tensor:
    picked = values[select]
    return picked.mean() if picked.numel() else values.new_zeros(())


def logsigmoid_flow_loss(
    logp_n: Tensor,
    logp_a: Tensor,
    mask: Tensor,
    boundaries: tuple[Tensor, Tensor] | None,
    bgspp_lambda: float = 1.0,
) -> tuple[Tensor, dict[str, float]]:
    """Flow objective of ``train.train`` (CNN entry point).

    Without anomalies (or in stage 1, boundaries=None): -mean(log sigmoid(logp)).
    With anomalies: ML for normals (centre 0) and anomalies (centre 1), focal loss on
    softmax([logp_n, logp_a]) and lambda * semi-push-pull around (b_n, b_n - tau).
    """
    if boundaries is None or not bool((mask == 1).any()):
        loss = -F.logsigmoid(logp_n[mask == 0]).mean() if (mask == 0).any() else logp_n.new_zeros(())
        return loss, {"flow_ml": _item(loss)}
    loss_ml = masked_mean(-F.logsigmoid(logp_n), mask == 0)
    loss_ml_a = masked_mean(-F.logsigmoid(logp_a), mask == 1)
    probs = torch.softmax(torch.stack([logp_n, logp_a], dim=-1), dim=-1)
    loss_focal = focal_loss(probs, mask)
    loss_n_con, loss_a_con = semi_push_pull_loss(logp_n, mask, *boundaries)
    loss = loss_ml + loss_ml_a + loss_focal + bgspp_lambda * (loss_n_con + loss_a_con)
    parts = {"flow_ml": _item(loss_ml), "flow_ml_anomaly": _item(loss_ml_a), "focal": _item(loss_focal),
             "bgspp": _item(loss_n_con + loss_a_con)}
    return loss, parts


def combined_flow_loss(
    logp_n: Tensor, logp_a: Tensor, mask: Tensor, boundaries: tuple[Tensor, Tensor] | None
) -> tuple[Tensor, dict[str, float]]:
    """Flow objective of ``train.train2`` (get_flow_loss / get_flow_loss_with_boundary).

    -logp for normals (centre 0) and anomalies (centre 1), focal loss when anomalies exist,
    plus the semi-push-pull terms (weight 1) when boundaries are given (stage 2).
    """
    loss_logp = masked_mean(-logp_n, mask == 0) + masked_mean(-logp_a, mask == 1)
    loss_focal = logp_n.new_zeros(())
    if bool((mask == 1).any()):
        probs = torch.softmax(torch.stack([logp_n, logp_a], dim=-1), dim=-1)
        loss_focal = focal_loss(probs, mask)
    loss = loss_logp + loss_focal
    parts = {"flow_ml": _item(loss_logp), "focal": _item(loss_focal)}
    if boundaries is not None:
        loss_n_con, loss_a_con = semi_push_pull_loss(logp_n, mask, *boundaries)
        loss = loss + loss_n_con + loss_a_con
        parts["bgspp"] = _item(loss_n_con + loss_a_con)
    return loss, parts
