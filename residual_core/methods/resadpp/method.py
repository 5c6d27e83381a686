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
from residual_core.methods.resadpp.flow import position_table
from residual_core.methods.resadpp.losses import gaussian_logp
from residual_core.methods.resadpp.residuals import grouped_residual_maps, residual_maps, token_maps
from residual_core.methods.resadpp.scoring import TestSetNormaliser, merged_output, raw_batch
from residual_core.methods.resadpp.training import UNKNOWN, ResADppTrainer, TrainBatch, build_flows
from residual_core.methods.resadpp.vq import MultiLevelVQ, match_feature_distribution
from residual_core.methods.set_normalisation import RawBatch

# Flow rows per scoring step. On a CPU a step's subnet activations (rows x 2 (channels / 2 + pos_embed_dim)
# floats: 536-624 wide) should stay in cache across a coupling's GEMMs: 2,048 rows (~4-5 MB) ran the
# 224 px flows 1.2-1.5x faster than the 8,192-row `position_batch` steps used before (RESULTS.md, twelfth
# pass); a grid wider than that is split into runs of positions. Off the CPU the authors' whole batch per
# level (validate.py): chunks of 8,192 rows made a batch of 32 at 224 px 21 chunks x 10 couplings of small
# kernels on a GPU, bound by their launches (RESULTS.md, eighth pass); 2^18 rows hold the widest subnet
# activations (624 wide at 112 channels) at ~0.65 GB.
CPU_FLOW_ROWS = 2048
ACCELERATOR_FLOW_ROWS = 1 << 18


def flow_step_rows(device: torch.device) -> int:
    """Rows per scoring flow step: `CPU_FLOW_ROWS` on a CPU, `ACCELERATOR_FLOW_ROWS` elsewhere."""
    return CPU_FLOW_ROWS if device.type == "cpu" else ACCELERATOR_FLOW_ROWS


def grid_steps(grids: int, positions: int, rows: int) -> list[tuple[slice, slice]]:
    """Flow steps over `grids` grids of `positions` rows each: (rows of the step, the grid positions they
    hold). Whole grids, as many as fit in `rows` (at least one); a grid wider than `rows` in equal runs."""
    if positions <= rows:
        per_step = rows // positions * positions
        total = grids * positions
        return [(slice(s, min(s + per_step, total)), slice(None)) for s in range(0, total, per_step)]
    runs = -(-positions // rows)
    width = -(-positions // runs)
    return [(slice(g * positions + p, g * positions + min(p + width, positions)), slice(p, p + width))
            for g in range(grids) for p in range(0, positions, width)]


class ResADpp(AnomalyMethod):
    name = "resadpp"
    trainable = True
    uses_normal_pool = True  # stage 1, stage 2 and the per-batch references draw on the train normals

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
    def score_raw(self, images: Tensor, bank) -> RawBatch:
        """Per-level flow outputs at feature resolution: normal log-likelihoods and anomaly probabilities."""
        references = self._bank_references(bank)
        with torch.no_grad():
            residuals = residual_maps(self.feature_maps(images), references, self.config.residual_squared)
        return raw_batch(*self._level_outputs(residuals))

    def _level_outputs(self, residuals: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """The scoring path from residuals (validate.py): VQ + feature distribution matching, constraintor,
        flows, all in eval mode and no_grad; per level the normal log-likelihood and anomaly probability
        maps [B, H, W]."""
        cfg = self.config
        for module in (self.vq, self.constraintor, self.flows):
            module.eval()
        logp_maps, prob_maps = [], []
        with torch.no_grad():
            aligned = residuals
            if cfg.distribution_matching:
                quantized = self.vq.quantize(residuals)
                aligned = [match_feature_distribution(r, q, cfg.fdm_alpha)
                           for r, q in zip(residuals, quantized, strict=True)]
            for level, e in enumerate(self.constraintor(aligned)):
                logp_n, logp_a = self._flow_logps(level, e)
                logp_maps.append(logp_n)
                prob_maps.append(torch.softmax(torch.stack([logp_n, logp_a], dim=-1), dim=-1)[..., 1])
        return logp_maps, prob_maps

    def score(self, images: Tensor, bank) -> ScoreOutput:
        """Batch-independent scores: log-likelihoods normalised by the offsets fixed after training.

        The authors' whole-set normalisation is `set_normaliser()` (what `evaluate` uses by default)."""
        raw = self.score_raw(images, bank)
        levels = range(len(self.channels))
        return merged_output([raw[f"logp_{i}"] for i in levels], [raw[f"prob_{i}"] for i in levels],
                             self.logp_offsets, images.shape[-1], self.config.smoothing_sigma,
                             branch=self.config.score_branch)

    def set_normaliser(self) -> TestSetNormaliser | None:
        if self.config.score_normalisation != "test_set":
            return None
        size = int(self.backbone.image_size)
        cfg = self.config
        return TestSetNormaliser(len(self.channels), size, cfg.smoothing_sigma, cfg.score_branch)

    def _flow_logps(self, level: int, features: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position (normal, abnormal) log-likelihoods [B, H, W], in steps of about `flow_step_rows`
        rows (conditional flows: whole grids, or runs of one grid's positions when a grid is wider)."""
        b, c, h, w = features.shape
        rows = features.permute(0, 2, 3, 1).reshape(-1, c)
        flow = self.flows[level]
        step = flow_step_rows(rows.device)
        if self.config.conditional_flow:  # each block's condition term once per grid position, not per row
            steps = grid_steps(b, h * w, step)
            terms = flow.condition_terms(position_table(self.config.pos_embed_dim, h, w, rows.device))
        else:
            steps = [(slice(start, start + step), None) for start in range(0, rows.shape[0], step)]
        normal, abnormal = [], []
        for chunk, positions in steps:
            if positions is None:
                z, log_jac = flow(rows[chunk])
            else:
                z, log_jac = flow.forward_grids(rows[chunk], [term[positions] for term in terms])
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
        """Two-stage training on auxiliary categories (main.py), then the likelihood-offset calibration.

        With a `normal_pool` (the category's normal `train` images) the data are the authors': stage 1
        on the pool (`MVTEC(train=True)`), stage 2 on the pool plus `images` (`MVTECANO`: train + test),
        and every batch draws `train_ref_shot` references per category from the pool, with replacement
        (`get_random_normal_images`). Without a pool: stage 1 on the normal `images`, stage 2 on all
        `images`, references drawn the same way from `references`.
        """
        cfg = self.config
        _check_train_data(data)
        trainer = ResADppTrainer(cfg, self.vq, self.constraintor, self.flows, self.boundaries)
        stage1, stage2 = stage_items(data)
        if not stage1 and cfg.first_stage_epochs > 0:
            raise MethodError("resadpp: stage 1 needs normal images (a normal_pool or label-0 images); "
                              "the training data has none")
        rng = np.random.default_rng(cfg.seed)
        shuffle = torch.Generator().manual_seed(cfg.seed)
        step = 0
        for epoch in range(cfg.epochs):
            stage = 1 if epoch < cfg.first_stage_epochs else 2
            pool = stage1 if stage == 1 else stage2
            order = torch.randperm(len(pool), generator=shuffle).tolist()
            for batch_items in _batches([pool[i] for i in order], cfg.batch_size):
                losses = trainer.step(TrainBatch(*self._residual_batch(data, batch_items, rng)), stage)
                step += 1
                if log is not None:  # each loss term of this step (mean over its position sub-batches)
                    log(step, {**{f"loss_{k}": v for k, v in losses.means().items()},
                               "epoch": float(epoch), "stage": float(stage)})
            trainer.end_epoch()
        self.calibrate_offsets(data, rng)

    def planned_steps(self, data: Sequence[CategoryTrainData]) -> int:
        """Steps of `fit`: per epoch, the batches of that epoch's stage pool (full batches, or one short)."""
        cfg = self.config
        stage1, stage2 = stage_items(data)
        per_epoch = [_batch_count(len(stage1), cfg.batch_size), _batch_count(len(stage2), cfg.batch_size)]
        return cfg.first_stage_epochs * per_epoch[0] + (cfg.epochs - cfg.first_stage_epochs) * per_epoch[1]

    def calibrate_offsets(self, data: Sequence[CategoryTrainData],
                          rng: np.random.Generator | None = None) -> Tensor:
        """Set `logp_offsets[l]` to the largest normal log-likelihood of level l on the calibration images.

        The calibration images are the normal `images` (label 0; the test split in the pipelines), each
        batch with references drawn per category as in training, passed through the scoring path of
        `score()` (VQ + feature distribution matching, constraintor and flows in eval mode, every
        position, no position sub-batch dropped), in no_grad with the final weights. Test-split normals
        are never among their own references, like the images `score()` sees; a training set without
        any such image falls back to the stage-1 images. Returns the offsets.
        """
        cfg = self.config
        rng = rng if rng is not None else np.random.default_rng(cfg.seed)
        items = calibration_items(data)
        if not items:
            raise MethodError("resadpp: calibrating the likelihood offsets needs normal images")
        maxima = torch.full((len(self.channels),), -torch.inf)
        for start in range(0, len(items), cfg.batch_size):
            with torch.no_grad():
                residuals, _ = self._residual_batch(data, items[start:start + cfg.batch_size], rng)
            logp_maps, _ = self._level_outputs(residuals)
            for level, logp_n in enumerate(logp_maps):
                maxima[level] = torch.maximum(maxima[level], logp_n.max().float().cpu())
        if not torch.isfinite(maxima).all():
            raise MethodError(f"resadpp: calibrated likelihood offsets are not finite: {maxima.tolist()}")
        self.logp_offsets.copy_(maxima.to(self.logp_offsets.device))
        return self.logp_offsets

    def training_data_record(self, data: Sequence[CategoryTrainData]) -> dict[str, dict]:
        """Per category: stage-1 and stage-2 images by split, the reference pool and its draw rule, and
        the images the likelihood offsets are calibrated on."""
        cfg = self.config
        draw = (f"{cfg.train_ref_shot} per category present in a batch, uniformly with replacement from "
                "the pool, redrawn every batch (get_random_normal_images)")
        calibration = calibration_items(data)
        record = {}
        for c, cat in enumerate(data):
            n_images, n_normal = int(cat.images.shape[0]), int((cat.labels == 0).sum())
            with_mask = int(((cat.labels != 0) & cat.has_mask.bool()).sum()) if cat.masks is not None else 0
            pool = cat.normal_pool
            if pool is not None:
                stage1 = {"images": len(pool), "splits": {pool.split: len(pool)}}
                stage2 = {"images": len(pool) + n_images,
                          "splits": _split_counts((pool.split, len(pool)), (cat.image_split, n_images))}
            else:
                stage1 = {"images": n_normal, "splits": {cat.image_split: n_normal}}
                stage2 = {"images": n_images, "splits": {cat.image_split: n_images}}
            stage2.update(anomalous=n_images - n_normal, anomalous_with_mask=with_mask)
            source, size, split = _reference_source(cat)
            calibrated = [src for k, src, _ in calibration if k == c]
            calibration_split = cat.image_split if IMAGES in calibrated else (pool.split if pool else None)
            record[cat.name] = {
                "stage1": {**stage1, "labels": "normal", "epochs": cfg.first_stage_epochs},
                "stage2": {**stage2, "epochs": cfg.epochs - cfg.first_stage_epochs},
                "reference_pool": {"field": source, "images": size, "split": split, "draw": draw},
                "offset_calibration": {"images": len(calibrated), "split": calibration_split,
                                       "labels": "normal"},
            }
        return record

    def _residual_batch(self, data: Sequence[CategoryTrainData], items: Sequence[Item],
                        rng: np.random.Generator) -> tuple[list[Tensor], Tensor]:
        """Per-level residuals [B, C, H, W] of `items` against references drawn for this batch, and the
        position labels [B, 1, S, S]."""
        images = torch.cat([_take(data[c], source, [i]) for c, source, i in items])
        position_labels = torch.cat([_position_labels(data[c], source, i) for c, source, i in items])
        categories = [c for c, _, _ in items]
        picks = draw_references(data, categories, self.config.train_ref_shot, rng)
        drawn = [_take(data[c], _reference_source(data[c])[0], p.tolist()) for c, p in picks.items()]
        maps = self.feature_maps(torch.cat([images, *drawn]).to(self.device))
        b = len(items)
        query_maps = [level[:b] for level in maps]
        groups, start = [], b
        for c, refs in zip(picks, drawn, strict=True):
            rows = torch.tensor([k for k, cat in enumerate(categories) if cat == c], device=self.device)
            stop = start + refs.shape[0]
            groups.append((rows, [level[start:stop].flatten(2).transpose(1, 2).reshape(-1, level.shape[1])
                                  for level in maps]))
            start = stop
        residuals = grouped_residual_maps(query_maps, groups, self.config.residual_squared)
        return residuals, position_labels.to(self.device)


def _probe_backbone(backbone) -> tuple[list[int], list[tuple[int, int]]]:
    """Channels and grids per level from one forward pass on a blank image."""
    device = next(backbone.parameters()).device
    size = int(backbone.image_size)
    backbone.eval()
    with torch.no_grad():
        feats = backbone.forward_features(torch.zeros(1, 3, size, size, device=device))
    return [int(t.shape[-1]) for t in feats.patch_tokens], [tuple(int(v) for v in g) for g in feats.grids]


def _batch_count(items: int, batch_size: int) -> int:
    """How many batches `_batches` yields for `items` items."""
    return items // batch_size or (1 if items else 0)


def _batches(items: list, batch_size: int):
    """Full batches only (drop_last=True), but one short batch when there is no full one."""
    full = len(items) // batch_size
    if full == 0:
        if items:
            yield items
        return
    for b in range(full):
        yield items[b * batch_size:(b + 1) * batch_size]


POOL, IMAGES = "normal_pool", "images"  # where a training item's image lives
Item = tuple[int, str, int]  # (category position in the data, POOL or IMAGES, image index)


def stage_items(data: Sequence[CategoryTrainData]) -> tuple[list[Item], list[Item]]:
    """(category, source, index) of the stage-1 and stage-2 images (see `ResADpp.fit`)."""
    stage1, stage2 = [], []
    for c, cat in enumerate(data):
        every = [(c, IMAGES, i) for i in range(cat.images.shape[0])]
        if cat.normal_pool is not None:
            pool = [(c, POOL, i) for i in range(len(cat.normal_pool))]
            stage1 += pool
            stage2 += pool + every
        else:
            stage1 += [(c, IMAGES, i) for i in (cat.labels == 0).nonzero()[:, 0].tolist()]
            stage2 += every
    return stage1, stage2


def calibration_items(data: Sequence[CategoryTrainData]) -> list[Item]:
    """The normal `images` of every category; the stage-1 images when there are none."""
    items = [(c, IMAGES, i) for c, cat in enumerate(data) for i in (cat.labels == 0).nonzero()[:, 0].tolist()]
    return items or stage_items(data)[0]


def draw_references(data: Sequence[CategoryTrainData], categories: Sequence[int], shot: int,
                    rng: np.random.Generator) -> dict[int, np.ndarray]:
    """The references of one batch: for each category in it (sorted, like np.unique of the batch's class
    names), `shot` indices drawn uniformly with replacement from its reference source
    (`get_random_normal_images`). Repeats are merged: a repeated reference adds no nearest neighbour,
    so each drawn image is encoded once."""
    return {c: np.unique(rng.integers(_reference_source(data[c])[1], size=shot))
            for c in sorted(set(categories))}


def _reference_source(category: CategoryTrainData) -> tuple[str, int, str]:
    """(field, size, split) the per-batch references are drawn from: the normal pool, else `references`."""
    pool = category.normal_pool
    if pool is not None and len(pool) > 0:
        return POOL, len(pool), pool.split
    return "references", int(category.references.shape[0]), category.reference_split


def _take(category: CategoryTrainData, source: str, index: list[int]) -> Tensor:
    """Float images [n, 3, S, S] of one category from `images`, `references` or the normal pool."""
    if source == POOL:
        return category.normal_pool.images(index)
    tensor = category.images if source == IMAGES else category.references
    return tensor[torch.as_tensor(index, dtype=torch.long)].float()


def _split_counts(*pairs: tuple[str, int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for split, n in pairs:
        counts[split] = counts.get(split, 0) + n
    return counts


def _position_labels(category: CategoryTrainData, source: str, index: int) -> Tensor:
    """[1, 1, S, S]: 0 for normal images, the mask for anomalies with one, -1 (unknown) otherwise."""
    h, w = category.images.shape[-2:]
    labels = torch.zeros(1, 1, h, w)
    if source != IMAGES or int(category.labels[index]) == 0:
        return labels
    if category.masks is not None and bool(category.has_mask[index]):
        return (category.masks[index:index + 1].float() > 0.5).float()
    return labels.fill_(UNKNOWN)


def _check_train_data(data: Sequence[CategoryTrainData]) -> None:
    if not data:
        raise MethodError("resadpp: fit needs at least one training category")
    for cat in data:
        cat.check_shapes("resadpp")
        if _reference_source(cat)[1] == 0:
            raise MethodError(f"resadpp: {cat.name}: needs at least one normal reference image "
                              "(a non-empty normal_pool or references [K,3,S,S])")
