"""A category's metrics from its metric groups: per defect type (hand-computed image AUROC, pixel AP by
scikit-learn), the category as the merge of everything, categories without pixel ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from residual_core.metrics import GroupedAccumulator, MetricAccumulator
from tests.residual_core.metrics.references import sklearn_metrics
from workflows.pipelines.metric_groups import (
    NO_PIXEL_TRUTH,
    category_accumulator,
    category_metrics,
    group_of,
)

# normals 0.1, 0.4; "scratch" 0.3, 0.9 (3 of 4 pairs ranked right); untyped 0.5, 0.6 (4 of 4);
# a defect type called "normal" (0.2: 1 of 2) stays apart from the normal images
ROWS = [(0, "good", 0.1), (1, "scratch", 0.3), (0, "good", 0.4), (1, None, 0.5), (1, "scratch", 0.9),
        (1, None, 0.6), (1, "normal", 0.2)]
HAND_AUROC = {"scratch": 0.75, "anomalous": 1.0, "normal": 0.5}


def _case(size: int = 5):
    labels = np.array([r[0] for r in ROWS])
    scores = np.array([r[2] for r in ROWS], np.float32)
    rng = np.random.default_rng(1)
    masks = np.zeros((len(ROWS), size, size), bool)
    for i in np.flatnonzero(labels):
        masks[i, i % size, :3] = True
    maps = (rng.random((len(ROWS), size, size)) + masks).astype(np.float32)
    grouped = GroupedAccumulator()
    grouped.update([group_of(label, defect) for label, defect, _ in ROWS], scores, labels, maps, masks)
    return grouped, labels, scores, maps, masks


def test_per_defect_type_metrics_against_the_normals():
    grouped, labels, scores, maps, masks = _case()
    category, per_type = category_metrics(grouped, pixel_gt=True)
    assert sorted(per_type) == sorted(HAND_AUROC)
    for defect, expected in HAND_AUROC.items():
        assert per_type[defect]["I-AUROC"] == pytest.approx(expected, abs=1e-12), defect
        rows = [i for i, (label, d, _) in enumerate(ROWS) if label == 0 or (d or "anomalous") == defect]
        _, p_ap, _ = sklearn_metrics(masks[rows], maps[rows])
        assert per_type[defect]["P-AP"] == pytest.approx(p_ap, abs=1e-9), defect
        assert per_type[defect]["counts"]["normal_images"] == 2
    single = MetricAccumulator()
    single.update(scores, labels, maps, masks)
    assert category == json.loads(json.dumps(single.compute()))  # the category: unchanged, JSON-clean
    assert json.loads(json.dumps(per_type)) == per_type


def test_without_pixel_ground_truth_pixel_metrics_are_undefined_per_type_too():
    grouped = _case()[0]
    category, per_type = category_metrics(grouped, pixel_gt=False)
    for metrics in (category, *per_type.values()):
        assert metrics["P-AUROC"] is None and metrics["not_defined"]["P-AUROC"] == NO_PIXEL_TRUTH
        assert metrics["I-AUROC"] is not None


def test_a_category_without_normals_has_undefined_per_type_metrics():
    grouped = GroupedAccumulator()
    grouped.update([group_of(1, "scratch")] * 2, np.array([0.2, 0.3]), np.array([1, 1]))
    _, per_type = category_metrics(grouped, pixel_gt=False)
    assert per_type["scratch"]["I-AUROC"] is None
    assert "no normal images" in per_type["scratch"]["not_defined"]["I-AUROC"]


def test_shard_states_of_both_formats_read_as_one_accumulator():
    grouped, labels, scores, maps, masks = _case()
    single = MetricAccumulator()
    single.update(scores, labels, maps, masks)
    assert category_accumulator(grouped.state_dict()).compute() == single.compute()
    assert category_accumulator(single.state_dict()).compute() == single.compute()  # protocol 2 jobs
