"""GroupedAccumulator: per-group metrics against a hand-computed case, and the merge of all groups equal
to one accumulator fed everything (bit-identical state, also when the histograms collapse)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from residual_core.metrics import GroupedAccumulator, MetricAccumulator
from tests.residual_core.metrics.references import assert_same_histogram_state, sklearn_metrics

# two normals, two "scratch" and two "dent" images with known image scores
GROUPS = ["normal", "scratch", "normal", "dent", "scratch", "dent"]
LABELS = np.array([0, 1, 0, 1, 1, 1])
SCORES = np.array([0.1, 0.3, 0.4, 0.5, 0.9, 0.6], np.float32)
# image AUROC by hand: the fraction of (anomalous, normal) pairs ranked right
# scratch {0.3, 0.9} vs normals {0.1, 0.4}: 0.3 > 0.1, 0.3 < 0.4, 0.9 > both -> 3/4
# dent {0.5, 0.6} vs normals: 4/4; everything: 7/8
HAND_AUROC = {"scratch": 0.75, "dent": 1.0, None: 0.875}


def hand_case(size: int = 6):
    rng = np.random.default_rng(3)
    masks = np.zeros((len(LABELS), size, size), bool)
    masks[1, 1:3, 1:3] = True
    masks[3, 2:5, 0:2] = True
    masks[4, 0, 0:4] = True
    masks[5, 4:6, 4:6] = True
    maps = (rng.random((len(LABELS), size, size)) + 0.8 * masks).astype(np.float32)
    return maps, masks


def test_per_group_metrics_match_the_hand_computed_case():
    maps, masks = hand_case()
    grouped = GroupedAccumulator(pixel=True)
    grouped.update(GROUPS[:4], SCORES[:4], LABELS[:4], maps[:4], masks[:4])  # two batches
    grouped.update(GROUPS[4:], SCORES[4:], LABELS[4:], maps[4:], masks[4:])
    assert sorted(grouped.groups) == ["dent", "normal", "scratch"]
    for defect, expected in HAND_AUROC.items():
        names = None if defect is None else ["normal", defect]
        metrics = grouped.merged(names).compute()
        assert metrics["I-AUROC"] == pytest.approx(expected, abs=1e-12), defect
        rows = [i for i, g in enumerate(GROUPS) if defect is None or g in ("normal", defect)]
        p_auroc, p_ap, _ = sklearn_metrics(masks[rows], maps[rows])
        assert metrics["P-AUROC"] == pytest.approx(p_auroc, abs=1e-9), defect
        assert metrics["P-AP"] == pytest.approx(p_ap, abs=1e-9), defect
        assert metrics["counts"]["images"] == len(rows)


@pytest.mark.parametrize("pixel_capacity", [1 << 21, 64])  # exact, and collapsed (shift > 0)
def test_merge_of_all_groups_equals_one_accumulator(pixel_capacity):
    rng = np.random.default_rng(0)
    images, size = 30, 16
    labels = (np.arange(images) % 3 != 0).astype(int)
    masks = np.zeros((images, size, size), bool)
    for i in np.flatnonzero(labels):
        masks[i, rng.integers(size - 4):, rng.integers(size - 4):][:3, :3] = True
    maps = rng.normal(size=(images, size, size)).astype(np.float32) + masks
    scores = maps.reshape(images, -1).max(axis=1)
    groups = np.where(labels == 0, "normal", np.where(np.arange(images) % 2 == 0, "a", "b"))
    has_mask = np.arange(images) != 4  # one anomalous image without a mask (image metrics only)
    single = MetricAccumulator(pixel_capacity=pixel_capacity)
    grouped = GroupedAccumulator(pixel_capacity=pixel_capacity)
    other = GroupedAccumulator(pixel_capacity=pixel_capacity)
    for start in range(0, images, 7):
        part = slice(start, start + 7)
        single.update(scores[part], labels[part], maps[part], masks[part], has_mask[part])
        target = grouped if start < 14 else other  # two shards, merged afterwards
        target.update(groups[part], torch.from_numpy(scores[part]), torch.from_numpy(labels[part]),
                      torch.from_numpy(maps[part]), torch.from_numpy(masks[part]), has_mask[part])
    state = pickle.loads(pickle.dumps(grouped.merge(other).state_dict()))
    restored = GroupedAccumulator.from_state_dict(state)
    merged = restored.merged()
    for hist in ("image_histogram", "pixel_histogram"):
        assert_same_histogram_state(merged.state_dict()[hist], single.state_dict()[hist])
    assert merged.compute() == single.compute()
    if pixel_capacity == 64:
        assert merged.compute()["resolution"]["pixel_shift"] > 0


def test_groups_must_match_the_batch():
    with pytest.raises(ValueError, match="groups has 1 entries for 2"):
        GroupedAccumulator().update(["normal"], [0.1, 0.2], [0, 1])
    with pytest.raises(ValueError, match="unsupported grouped metric state"):
        GroupedAccumulator.from_state_dict(MetricAccumulator().state_dict())


def test_rows_ordered_by_group_give_the_same_states_as_interleaved_rows():
    maps, masks = hand_case()
    order = np.argsort(np.array(GROUPS), kind="stable")  # each group one run: slices, no copies
    interleaved, ordered = GroupedAccumulator(), GroupedAccumulator()
    interleaved.update(GROUPS, SCORES, LABELS, torch.from_numpy(maps), masks)
    ordered.update([GROUPS[i] for i in order], SCORES[order], LABELS[order], torch.from_numpy(maps[order]),
                   masks[order])
    for name in GROUPS:
        for hist in ("image_histogram", "pixel_histogram"):
            assert_same_histogram_state(ordered.groups[name].state_dict()[hist],
                                        interleaved.groups[name].state_dict()[hist])
