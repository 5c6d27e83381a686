"""A few ResAD++ training steps on generated residuals lower the losses in both stages."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from residual_core.methods.resadpp.boundary import BoundaryAverager
from residual_core.methods.resadpp.config import make_config
from residual_core.methods.resadpp.constraintor import MultiLevelConstraintor
from residual_core.methods.resadpp.training import ResADppTrainer, TrainBatch, build_flows, level_labels
from residual_core.methods.resadpp.vq import MultiLevelVQ

CHANNELS = [6, 10]


def make_trainer(**overrides):
    cfg = make_config(**{"lr": 3e-3, "pos_embed_dim": 8, "coupling_layers": 1, "num_embeddings": 16,
                         "position_batch": 10_000, "keep_partial_position_batch": True, **overrides})
    torch.manual_seed(0)
    vq = MultiLevelVQ(CHANNELS, cfg.num_embeddings)
    constraintor = MultiLevelConstraintor(CHANNELS, cfg.constraintor)
    flows: nn.ModuleList = build_flows(CHANNELS, cfg)
    boundaries = BoundaryAverager(len(CHANNELS), cfg.boundary_momentum)
    return ResADppTrainer(cfg, vq, constraintor, flows, boundaries), boundaries


def make_batch(with_anomalies: bool) -> TrainBatch:
    g = torch.Generator().manual_seed(1)
    residuals = [torch.randn(4, 6, 8, 8, generator=g) ** 2, torch.randn(4, 10, 4, 4, generator=g) ** 2]
    labels = torch.zeros(4, 1, 16, 16)
    if with_anomalies:
        labels[2, :, 4:12, 4:12] = 1
        labels[3] = -1  # anomalous image without a mask
        for r in residuals:
            r[2, :, r.shape[2] // 4: 3 * r.shape[2] // 4, r.shape[3] // 4: 3 * r.shape[3] // 4] += 3.0
    return TrainBatch(residuals, labels)


def run(trainer, batch, stage, steps):
    return [trainer.step(batch, stage).means() for _ in range(steps)]


@pytest.mark.parametrize("preset", ["cnn", "vit"])
def test_stage_one_lowers_losses(preset):
    trainer, boundaries = make_trainer(preset=preset)
    history = run(trainer, make_batch(with_anomalies=False), stage=1, steps=5)
    for name in ("vq", "occ", "flow"):
        assert history[-1][name] < history[0][name], (name, history[0][name], history[-1][name])
    assert "focal" not in history[-1] or history[-1]["focal"] == 0.0
    assert boundaries.get(0).item() != 0.0  # the normal boundary is tracked in stage 1


@pytest.mark.parametrize("preset", ["cnn", "vit"])
def test_stage_two_lowers_losses(preset):
    # momentum 0: the boundary follows the current model, so the flow objective is stationary for the check
    trainer, _ = make_trainer(preset=preset, boundary_momentum=0.0)
    batch = make_batch(with_anomalies=True)
    run(trainer, make_batch(with_anomalies=False), stage=1, steps=1)
    history = run(trainer, batch, stage=2, steps=4)
    assert history[0]["focal"] > 0 and "bgspp" in history[0]
    for name in ("vq", "occ"):
        assert history[-1][name] < history[0][name], (name, history[0][name], history[-1][name])
    # the constraintor moves anomalous features (raising their flow loss): freeze it to see the flow learn
    for group in trainer.opt_constraintor.param_groups:
        group["lr"], group["weight_decay"] = 0.0, 0.0
    history = run(trainer, batch, stage=2, steps=4)
    assert history[-1]["flow"] < history[0]["flow"], (history[0]["flow"], history[-1]["flow"])


def test_position_sub_batches_follow_the_authors_floor():
    trainer, _ = make_trainer(position_batch=100, keep_partial_position_batch=False)
    out = trainer.step(make_batch(False), stage=1)
    # level 0: 4*8*8 = 256 positions -> 2 steps; level 1: 4*4*4 = 64 -> 0 steps (remainder dropped)
    assert out.counts["flow"] == 2


def test_level_labels_keep_unknown_images_unknown():
    labels = torch.zeros(2, 1, 8, 8)
    labels[0, :, :4, :4] = 1
    labels[1] = -1
    near = level_labels(labels, (2, 2), "nearest")
    assert near[0].tolist() == [[1.0, 0.0], [0.0, 0.0]] and (near[1] == -1).all()
    soft = level_labels(labels, (4, 4), "bilinear", threshold=0.3)
    assert soft[0, :2, :2].eq(1).all() and soft[0, 2:, 2:].eq(0).all() and (soft[1] == -1).all()
