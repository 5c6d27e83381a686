"""Fine-tuning on generated data: losses fall, pairs are valid, mask-less anomalies skip pixel losses."""

import math

import pytest
import torch

from residual_core.methods import MethodError, create_method
from residual_core.methods.res2clip.training import PairBatch, PairSampler, batch_losses, cosine_with_warmup

from .helpers import synthetic_category


def _losses(method, batch):
    with torch.no_grad():
        even, odd = batch_losses(method, batch, True), batch_losses(method, batch, False)
    return {
        "visual": even["visual"],
        "text": even["text"],
        "residual_visual": even["residual_visual"],
        "residual_text": odd["residual_text"],
    }


def test_a_few_training_steps_lower_every_loss(clip_backbone):
    data = synthetic_category("widget", 64, count=8, seed=0)
    fixed = PairBatch(
        data.images,
        data.references[:1].expand(8, -1, -1, -1),
        data.labels.float(),
        data.masks,
        torch.ones(8, dtype=torch.bool),
    )
    method = create_method(
        "res2clip",
        clip_backbone,
        mode="finetune",
        train={"epochs": 4, "batch_size": 4, "lr_visual": 1e-2, "lr_text": 1e-2},
    )
    adapters = method.adapters
    before = _losses(method, fixed)
    logged, snapshots = [], {0: _snapshot(adapters)}

    def log(step, metrics):
        logged.append((step, metrics))
        snapshots[step] = _snapshot(adapters)

    method.fit([data], log)
    after = _losses(method, fixed)
    for name in before:
        assert after[name] < before[name], name
    assert [step for step, _ in logged] == list(range(1, 9))  # 2 steps x 4 epochs
    # alternating schedule: even epochs train the visual-residual adapters, odd ones the text-residual one
    assert "loss_residual_visual" in logged[0][1] and "loss_residual_text" in logged[2][1]
    assert torch.equal(snapshots[2]["res_text"], snapshots[0]["res_text"])  # frozen in epoch 0
    assert not torch.equal(snapshots[2]["res_global"], snapshots[0]["res_global"])
    assert torch.equal(snapshots[4]["res_global"], snapshots[2]["res_global"])  # frozen in epoch 1
    assert not torch.equal(snapshots[4]["res_text"], snapshots[2]["res_text"])
    assert not torch.equal(snapshots[4]["text"], snapshots[2]["text"])  # A_t trains every epoch
    assert logged[0][1]["lr_text"] == pytest.approx(0.5e-2)  # after step 1 of a 2-step warm-up
    assert method.training_datasets == [{"dataset": "synthetic", "category": "widget", "images": 8}]


def _snapshot(adapters):
    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()]).clone()

    return {
        "res_text": flat(adapters.res_text_adapter),
        "res_global": flat(adapters.res_vis_global_adapter),
        "text": flat(adapters.text_adapter),
    }


def test_pairs_take_a_normal_reference_of_the_same_category():
    categories = []
    for c in range(2):
        category = synthetic_category(f"c{c}", 8, count=4, seed=c)
        category.images = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 8, 8) + 100 * c
        category.references = -1.0 - torch.arange(2).float().view(2, 1, 1, 1).expand(2, 3, 8, 8) - 100 * c
        categories.append(category)
    sampler = PairSampler(categories, batch_size=3, generator=torch.Generator().manual_seed(0))
    seen = 0
    for _ in range(5):
        for batch in sampler.epoch("cpu"):
            for query, reference in zip(batch.queries[:, 0, 0, 0], batch.references[:, 0, 0, 0], strict=True):
                category = int(query // 100)
                index = int(query % 100)
                value = float(reference)
                if value < 0:  # one of the references of the same category
                    assert int(-value // 100) == category or (-value - 1) % 100 in (0, 1)
                    assert round(-(value + 100 * category)) in (1, 2)
                else:  # a normal query image (even index) of the same category, never the query itself
                    assert int(value // 100) == category and int(value % 100) % 2 == 0 and value != query
                seen += 1
                assert 0 <= index < 4
    assert seen == 5 * 8


def test_anomalies_without_masks_join_only_mask_free_losses():
    data = synthetic_category("nomask", 8, count=4, seed=0, with_masks=False)
    sampler = PairSampler([data], batch_size=4, generator=torch.Generator().manual_seed(0))
    batch = next(iter(sampler.epoch("cpu")))
    assert torch.equal(batch.pixel_valid, batch.labels == 0)
    assert batch.masks.sum() == 0
    assert batch.labels.sum() == 2  # the anomalous images still carry their labels (global losses)


def test_cosine_schedule_with_warmup():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = cosine_with_warmup(optimizer, warmup_steps=2, total_steps=6)
    factors = []
    for _ in range(7):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    cosine = [0.5 * (1 + math.cos(math.pi * progress)) for progress in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert factors == pytest.approx([0.0, 0.5, *cosine], abs=1e-6)


def test_training_data_errors(clip_backbone):
    method = create_method("res2clip", clip_backbone, mode="finetune")
    with pytest.raises(MethodError, match="at least one"):
        method.fit([])
    bad = synthetic_category("bad", 64, count=2)
    bad.labels = torch.zeros(3)
    with pytest.raises(MethodError, match="synthetic/bad"):
        method.fit([bad])
