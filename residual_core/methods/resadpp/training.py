"""Two-stage ResAD++ training (main.py epoch loop, train.train / train.train2).

Per batch, in the authors' order: (1) VQ codebook step on normal residuals, (2) constraintor step
with the log-barrier bidirectional OCC loss, (3) flow steps on the detached constrained residuals,
sub-batched over shuffled positions. Stage 1 (epoch < first_stage_epochs) sees normal images only;
stage 2 sees all images with their masks. Which images those are, and the per-level likelihood
offsets calibrated after training, are the method's business (`method.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from residual_core.methods.resadpp.boundary import BoundaryAverager
from residual_core.methods.resadpp.config import ResADppConfig
from residual_core.methods.resadpp.constraintor import MultiLevelConstraintor
from residual_core.methods.resadpp.flow import LevelFlow, position_rows
from residual_core.methods.resadpp.losses import (
    combined_flow_loss,
    gaussian_logp,
    log_barrier_bi_occ_loss,
    logsigmoid_flow_loss,
    normal_boundary,
    orthogonal_regularizer,
)
from residual_core.methods.resadpp.vq import MultiLevelVQ

UNKNOWN = -1.0  # position label for anomalous images without a pixel mask


@dataclass
class TrainBatch:
    """Residuals of one batch and its full-resolution position labels (0 normal, 1 anomalous, -1 unknown)."""

    residuals: list[Tensor]  # per level [B, C, H, W]
    position_labels: Tensor  # [B, 1, S, S]


@dataclass
class StepLosses:
    values: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values[name] = self.values.get(name, 0.0) + value
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        return {k: v / self.counts[k] for k, v in self.values.items()}

    def merge(self, other: StepLosses) -> None:
        for k, v in other.values.items():
            self.values[k] = self.values.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + other.counts[k]


def level_labels(position_labels: Tensor, size: tuple[int, int], mode: str, threshold: float = 0.3) -> Tensor:
    """Full-resolution labels [B, 1, S, S] -> [B, h, w]: nearest (main.py) or bilinear > 0.3 (main_ib.py).

    Images whose labels are unknown (-1) stay unknown at every level.
    """
    if mode == "nearest":
        return F.interpolate(position_labels, size=size, mode="nearest").squeeze(1)
    unknown = (position_labels < 0).flatten(1).all(dim=1)
    soft = F.interpolate(position_labels.clamp(min=0), size=size, mode="bilinear")
    labels = (soft > threshold).to(position_labels.dtype).squeeze(1)
    labels[unknown] = UNKNOWN
    return labels


def _rows(x: Tensor) -> Tensor:
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class ResADppTrainer:
    """Optimisers, schedules and one training step for the three learnable parts."""

    def __init__(self, config: ResADppConfig, vq: MultiLevelVQ, constraintor: MultiLevelConstraintor,
                 flows: nn.ModuleList, boundaries: BoundaryAverager) -> None:
        self.config = config
        self.vq, self.constraintor, self.flows = vq, constraintor, flows
        self.boundaries = boundaries
        self.generator = torch.Generator().manual_seed(config.seed)

        def adam(params):
            params = [p for p in params if p.requires_grad]
            if not params:  # an ablated part (constraintor "none"): nothing to optimise
                return None, None
            opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(config.lr_milestones),
                                                         gamma=config.lr_gamma)
            return opt, sched

        self.opt_vq, self.sched_vq = adam(vq.parameters())
        self.opt_constraintor, self.sched_constraintor = adam(constraintor.parameters())
        self.opt_flow, self.sched_flow = adam(flows.parameters())

    def end_epoch(self) -> None:
        """Step the three MultiStepLR schedules (once per epoch, as main.py does)."""
        for sched in (self.sched_vq, self.sched_constraintor, self.sched_flow):
            if sched is not None:
                sched.step()

    def step(self, batch: TrainBatch, stage: int) -> StepLosses:
        """VQ step, constraintor step, then flow sub-batch steps; returns summed loss items."""
        cfg = self.config
        losses = StepLosses()
        labels = [level_labels(batch.position_labels, r.shape[-2:], cfg.mask_downsampling, cfg.mask_threshold)
                  for r in batch.residuals]
        self.vq.train()
        self.constraintor.train()
        self.flows.train()

        if cfg.distribution_matching:
            loss_vq = self.vq.loss(batch.residuals, labels)
            self._apply(self.opt_vq, loss_vq)
            losses.add("vq", float(loss_vq.detach()))

        constrained = self.constraintor(batch.residuals)
        if self.opt_constraintor is not None:
            losses.add("occ", self._constraintor_step(constrained, batch.residuals, labels))

        for level, (e, m) in enumerate(zip(constrained, labels, strict=True)):
            losses.merge(self._flow_level(level, e.detach(), m, stage))
        return losses

    def _constraintor_step(self, constrained: list[Tensor], residuals: list[Tensor],
                           labels: list[Tensor]) -> float:
        """Log-barrier bidirectional OCC loss summed over levels (+ orthogonal term), one Adam step."""
        cfg = self.config
        targets = [r.detach().clone() for r in residuals]
        loss_occ = None
        for e, t, m in zip(constrained, targets, labels, strict=True):
            e, t, m = _rows(e), _rows(t), m.reshape(-1)
            known = m >= 0
            e, t, m = e[known], t[known], m[known]
            occ = log_barrier_bi_occ_loss(e, m, t).total
            if cfg.orthogonal_weight > 0:
                occ = occ + orthogonal_regularizer(e, m, cfg.orthogonal_weight)
            loss_occ = occ if loss_occ is None else loss_occ + occ
        self._apply(self.opt_constraintor, loss_occ)
        return float(loss_occ.detach())

    def _flow_level(self, level: int, features: Tensor, labels: Tensor, stage: int) -> StepLosses:
        cfg = self.config
        losses = StepLosses()
        b, c, h, w = features.shape
        e, m = _rows(features), labels.reshape(-1)
        pos = position_rows(cfg.pos_embed_dim, b, h, w, e.device) if cfg.conditional_flow else None
        known = m >= 0
        e, m = e[known], m[known]
        pos = pos[known] if pos is not None else None
        n = e.shape[0]
        perm = torch.randperm(n, generator=self.generator).to(e.device)
        steps = n // cfg.position_batch
        if cfg.keep_partial_position_batch and n % cfg.position_batch:
            steps += 1
        flow = self.flows[level]
        for i in range(steps):
            idx = perm[i * cfg.position_batch:(i + 1) * cfg.position_batch]
            m_b = m[idx]
            z, log_jac = flow(e[idx], pos[idx] if pos is not None else None)
            logp_n = gaussian_logp(z, log_jac, 0.0)
            logp_a = gaussian_logp(z, log_jac, 1.0)
            self.boundaries.update(level, normal_boundary(logp_n.detach(), m_b, cfg.pos_beta))
            bounds = None
            if stage == 2:
                b_n = self.boundaries.get(level)
                bounds = (b_n, b_n - cfg.margin_tau)
            if cfg.flow_objective == "logsigmoid":
                loss, parts = logsigmoid_flow_loss(logp_n, logp_a, m_b, bounds, cfg.bgspp_lambda)
            else:
                loss, parts = combined_flow_loss(logp_n, logp_a, m_b, bounds)
            if self._apply(self.opt_flow, loss):
                losses.add("flow", float(loss.detach()))
                for k, v in parts.items():
                    losses.add(k, v)
        return losses

    @staticmethod
    def _apply(optimizer: torch.optim.Optimizer, loss: Tensor) -> bool:
        """zero_grad / backward / step; skipped when the loss has no graph or is not finite."""
        if not loss.requires_grad or not torch.isfinite(loss):
            return False
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return True


def build_flows(channels: list[int], config: ResADppConfig) -> nn.ModuleList:
    cond = config.pos_embed_dim if config.conditional_flow else None
    return nn.ModuleList(
        LevelFlow(c, config.coupling_layers, config.clamp_alpha, cond, seed=config.seed + level)
        for level, c in enumerate(channels)
    )
