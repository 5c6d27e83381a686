"""The ResAD++ method: residuals -> VQ distribution matching -> constraintor -> flows -> anomaly maps."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from residual_core.methods.base import AnomalyMethod, CategoryTrainData, LogFn, MethodError, ScoreOutput
from residual_core.methods.resadpp import checkpoint as ckpt
from residual_core.methods.resadpp.boundary import BoundaryAverager
from residual_core.methods.resadpp.config import ResADppConfig
from residual_core.methods.resadpp.constraintor import MultiLevelConstraintor
from residual_core.methods.resadpp.flow import position_rows
from residual_core.methods.resadpp.losses import gaussian_logp
from residual_core.methods.resadpp.residuals import grouped_residual_maps, residual_maps, token_maps
from residual_core.methods.resadpp.scoring import boundary_anomaly_map, image_scores, likelihood_anomaly_map
from residual_core.methods.resadpp.training import UNKNOWN, ResADppTrainer, TrainBatch, build_flows
from residual_core.methods.resadpp.vq import MultiLevelVQ, match_feature_distribution

BRANCHES = ("likelihood", "boundary")  # validate.py scores1 (log-likelihood) and scores2 (BScores)


class ResADpp(AnomalyMethod):
    name = "resadpp"
    trainable = True

    def __init__(self, backbone, config: ResADppConfig | None = None) -> None:
        super().__init__(backbone)
        self.config = config or ResADppConfig()
        self.channels, self.grids = _probe_backbone(backbone)
        levels = len(self.channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.vq = MultiLevelVQ(self.channels, self.config.num_embeddings, self.config.vq_beta)
            self.constraintor = MultiLevelConstraintor(self.channels, self.config.constraintor)
            self.flows = build_flows(self.channels, self.config)
        self.boundaries = BoundaryAverager(levels, self.config.boundary_momentum)
        self.register_buffer("logp_offsets", torch.zeros(levels))
        for module in (self.vq, self.constraintor, self.flows, self.boundaries):
            module.to(self.device)
        self.logp_offsets = self.logp_offsets.to(self.device)

    # ----- features -------------------------------------------------------------------------------
    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """Backbone features per level as [B, D, H, W] (frozen backbone, no gradients)."""
        self.backbone.eval()
        with torch.no_grad():
            feats = self.backbone.forward_features(images.to(self.device))
        return token_maps(feats.patch_tokens, feats.grids)

    def learnable_state(self) -> dict[str, Tensor]:
        """Everything a checkpoint holds (the backbone is not part of it)."""
        state = {}
        for prefix in ("vq", "constraintor", "flows", "boundaries"):
            for key, value in getattr(self, prefix).state_dict().items():
                state[f"{prefix}.{key}"] = value
        state["logp_offsets"] = self.logp_offsets
        return state

    @property
    def preprocess(self) -> str:
        """The residual_core.preprocess preset of this method's images and masks (config.preprocess)."""
        return self.config.preprocess

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def save_checkpoint(self, directory: str | Path) -> None:
        ckpt.save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str | Path) -> None:
        ckpt.load_checkpoint(self, directory)

    @classmethod
    def from_checkpoint(cls, directory: str | Path, backbone) -> ResADpp:
        """Build with the saved configuration on `backbone`, then load the weights."""
        method = cls(backbone, ckpt.config_from_checkpoint(directory))
        method.load_checkpoint(directory)
        return method

    # ----- scoring ---------------------------------------------------------------------------------
    def score(self, images: Tensor, bank) -> ScoreOutput:
        references = self._bank_references(bank)
        cfg = self.config
        for module in (self.vq, self.constraintor, self.flows):
            module.eval()
        with torch.no_grad():
            residuals = residual_maps(self.feature_maps(images), references, cfg.residual_squared)
            quantized = self.vq.quantize(residuals)
            aligned = [match_feature_distribution(r, q, cfg.fdm_alpha) for r, q in zip(residuals, quantized,
                                                                                        strict=True)]
            constrained = self.constraintor(aligned)
            logp_maps, prob_maps = [], []
            for level, e in enumerate(constrained):
                logp_n, logp_a = self._flow_logps(level, e)
                logp_maps.append(logp_n)
                prob_maps.append(torch.softmax(torch.stack([logp_n, logp_a], dim=-1), dim=-1)[..., 1])
            size = images.shape[-1]
            likelihood = likelihood_anomaly_map(logp_maps, self.logp_offsets, size, cfg.smoothing_sigma)
            boundary = boundary_anomaly_map(prob_maps, size, cfg.smoothing_sigma)
            merged = (likelihood + boundary) / 2
        return ScoreOutput(
            anomaly_map=merged.float(),
            image_score=image_scores(merged).float(),
            branch_scores={"likelihood": image_scores(likelihood), "boundary": image_scores(boundary)},
            branches=BRANCHES,
        )

    def _flow_logps(self, level: int, features: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position (normal, abnormal) log-likelihoods [B, H, W], in position_batch chunks."""
        b, c, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, c)
        pos = position_rows(self.config.pos_embed_dim, b, h, w, rows.device) if self.config.conditional_flow \
            else None
        normal, abnormal = [], []
        for start in range(0, rows.shape[0], self.config.position_batch):
            chunk = slice(start, start + self.config.position_batch)
            z, log_jac = self.flows[level](rows[chunk], pos[chunk] if pos is not None else None)
            normal.append(gaussian_logp(z, log_jac, 0.0))
            abnormal.append(gaussian_logp(z, log_jac, 1.0))
        return torch.cat(normal).reshape(b, h, w), torch.cat(abnormal).reshape(b, h, w)

    def _bank_references(self, bank) -> list[Tensor]:
        features = list(bank.features)
        if len(features) != len(self.channels):
            raise MethodError(f"resadpp: bank has {len(features)} layers, "
                              f"the backbone gives {len(self.channels)}")
        for level, (ref, dim) in enumerate(zip(features, self.channels, strict=True)):
            if ref.ndim != 2 or ref.shape[1] != dim or ref.shape[0] == 0:
                raise MethodError(f"resadpp: bank layer {level} has shape {tuple(ref.shape)}, "
                                  f"expected [N>0, {dim}]")
        return [ref.to(self.device, torch.float32) for ref in features]

    # ----- training --------------------------------------------------------------------------------
    def fit(self, data: Sequence[CategoryTrainData], log: LogFn | None = None) -> None:
        """Two-stage training on auxiliary categories (main.py): normal images first, then all images."""
        cfg = self.config
        _check_train_data(data)
        trainer = ResADppTrainer(cfg, self.vq, self.constraintor, self.flows, self.boundaries,
                                 self.logp_offsets)
        refs = [self._reference_features(cat) for cat in data]
        stage1 = [(c, i) for c, cat in enumerate(data) for i in (cat.labels == 0).nonzero()[:, 0].tolist()]
        stage2 = [(c, i) for c, cat in enumerate(data) for i in range(len(cat.images))]
        if not stage1 and cfg.first_stage_epochs > 0:
            raise MethodError("resadpp: stage 1 needs normal (label 0) images; the training data has none")
        rng = np.random.default_rng(cfg.seed)
        shuffle = torch.Generator().manual_seed(cfg.seed)
        for epoch in range(cfg.epochs):
            stage = 1 if epoch < cfg.first_stage_epochs else 2
            pool = stage1 if stage == 1 else stage2
            order = torch.randperm(len(pool), generator=shuffle).tolist()
            epoch_losses = None
            for batch_items in _batches([pool[i] for i in order], cfg.batch_size):
                batch = self._train_batch(data, refs, batch_items, rng)
                step = trainer.step(batch, stage)
                if epoch_losses is None:
                    epoch_losses = step
                else:
                    epoch_losses.merge(step)
            trainer.end_epoch(track_offsets=epoch == cfg.epochs - 1)
            if log is not None:
                metrics = epoch_losses.means() if epoch_losses else {}
                log(epoch, {**{f"loss_{k}": v for k, v in metrics.items()}, "stage": float(stage)})

    def _reference_features(self, category: CategoryTrainData) -> list[Tensor]:
        """Per level [K, H*W, D] features of the category's normal references."""
        chunks = [self.feature_maps(part) for part in category.references.split(self.config.batch_size)]
        return [torch.cat([maps[level] for maps in chunks]).flatten(2).transpose(1, 2)
                for level in range(len(self.channels))]

    def _train_batch(self, data, refs, items, rng: np.random.Generator) -> TrainBatch:
        images = torch.stack([data[c].images[i] for c, i in items]).to(self.device)
        position_labels = torch.cat([_position_labels(data[c], torch.tensor([i])) for c, i in items])
        position_labels = position_labels.to(self.device)
        maps = self.feature_maps(images)
        groups = []
        categories = [c for c, _ in items]
        for c in sorted(set(categories)):
            rows = torch.tensor([k for k, cat in enumerate(categories) if cat == c], device=self.device)
            # get_random_normal_images: train_ref_shot draws with replacement per class and batch
            picks = torch.as_tensor(rng.integers(refs[c][0].shape[0], size=self.config.train_ref_shot),
                                    device=self.device)
            groups.append((rows, [level[picks].reshape(-1, level.shape[-1]) for level in refs[c]]))
        return TrainBatch(grouped_residual_maps(maps, groups, self.config.residual_squared), position_labels)


def _probe_backbone(backbone) -> tuple[list[int], list[tuple[int, int]]]:
    """Channels and grids per level from one forward pass on a blank image."""
    device = next(backbone.parameters()).device
    size = int(backbone.image_size)
    backbone.eval()
    with torch.no_grad():
        feats = backbone.forward_features(torch.zeros(1, 3, size, size, device=device))
    return [int(t.shape[-1]) for t in feats.patch_tokens], [tuple(int(v) for v in g) for g in feats.grids]


def _batches(items: list, batch_size: int):
    """Full batches only (drop_last=True), but one short batch when there is no full one."""
    full = len(items) // batch_size
    if full == 0:
        if items:
            yield items
        return
    for b in range(full):
        yield items[b * batch_size:(b + 1) * batch_size]


def _position_labels(category: CategoryTrainData, index: Tensor) -> Tensor:
    """[n, 1, S, S]: 0 for normal images, the mask for anomalies with one, -1 (unknown) otherwise."""
    n, _, h, w = len(index), *category.images.shape[1:]
    labels = torch.zeros(n, 1, h, w)
    anomalous = category.labels[index] != 0
    with_mask = anomalous & category.has_mask[index].bool()
    if category.masks is not None and bool(with_mask.any()):
        labels[with_mask] = (category.masks[index][with_mask].float() > 0.5).float()
    else:
        with_mask = torch.zeros_like(anomalous)
    labels[anomalous & ~with_mask] = UNKNOWN
    return labels


def _check_train_data(data: Sequence[CategoryTrainData]) -> None:
    if not data:
        raise MethodError("resadpp: fit needs at least one training category")
    for cat in data:
        cat.check_shapes("resadpp")
        if cat.references.shape[0] == 0:
            raise MethodError(f"resadpp: {cat.name}: needs at least one reference [K,3,S,S]")
