"""Curves on ``curve_bins`` (normal-only runs summed) equal the curves on every bin (``aligned()``)."""

import numpy as np
import pytest

from residual_core.metrics import curves
from residual_core.metrics.histogram import CollapsingHistogram
from tests.residual_core.metrics.test_histogram import histogram_of

REGIONS = 7
LIMIT = 0.3


def overlap_histogram(values: np.ndarray, positive: np.ndarray, capacity: int) -> CollapsingHistogram:
    """A histogram whose anomalous bins carry a region overlap (as pixel histograms do)."""
    hist = histogram_of(values, positive, capacity, chunk=97)
    hist.anomalous.overlap = np.arange(1, len(hist.anomalous) + 1, dtype=np.int64) << 20
    return hist


def metrics(counts: curves.CumulativeCounts) -> dict[str, float]:
    return {"auroc": curves.auroc(counts), "ap": curves.average_precision(counts),
            "f1max": curves.f1_max(counts), "aupro": curves.aupro(counts, REGIONS, LIMIT)}


def case(kind: str, seed: int = 0, size: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    positive = rng.random(size) < 0.05
    if kind == "ties":  # few distinct scores: shared keys between the classes, runs of every length
        values = rng.integers(0, 300, size).astype(np.float32) / 7
    else:
        values = rng.normal(size=size).astype(np.float32)
    values[positive] += 1.0
    return values, positive


@pytest.mark.parametrize(("kind", "capacity"), [("ties", 1 << 16), ("continuous", 1 << 16),
                                                ("continuous", 512)])
def test_curve_bins_give_the_metrics_of_every_bin(kind, capacity):
    hist = overlap_histogram(*case(kind), capacity)
    every, runs = hist.aligned(), curves.curve_bins(hist)
    assert runs.shift == every.shift and runs.distinct == len(every)
    assert len(runs.negatives) <= len(every)
    if every.shift == 0 and kind == "continuous":  # 5 % anomalous distinct scores: ~10 % of the points
        assert len(runs.negatives) < len(every) // 4
    full, summed = curves.CumulativeCounts.from_bins(every), curves.CumulativeCounts.from_bins(runs)
    assert (summed.positives, summed.negatives) == (full.positives, full.negatives)
    expected, got = metrics(full), metrics(summed)
    for name in ("auroc", "ap", "f1max"):  # integer AUROC, fsum AP, F1max at anomalous bins: same numbers
        assert got[name] == expected[name]
    assert got["aupro"] == pytest.approx(expected["aupro"], rel=1e-12, abs=1e-15)  # float trapezoids
    assert curves.error_bounds(summed, REGIONS, LIMIT) == curves.error_bounds(full, REGIONS, LIMIT)


def test_auroc_is_correctly_rounded():
    """AUROC is the exact fraction of correctly ranked pairs (ties one half), rounded once to a float."""
    rng = np.random.default_rng(3)
    normal = rng.integers(0, 40, 200) / 8  # many ties, within and across the classes
    anomalous = rng.integers(10, 50, 37) / 8
    values = np.concatenate([normal, anomalous]).astype(np.float32)
    positive = np.concatenate([np.zeros(200, dtype=bool), np.ones(37, dtype=bool)])
    hist = histogram_of(values, positive, 64, chunk=50)
    counts = curves.CumulativeCounts.from_bins(curves.curve_bins(hist))
    twice_wins = int(2 * (anomalous[:, None] > normal).sum() + (anomalous[:, None] == normal).sum())
    assert curves.auroc(counts) == twice_wins / (2 * 200 * 37)  # python ints: one correctly rounded division


def test_auroc_of_huge_counts_falls_back_to_float_trapezoids():
    big = 1 << 32
    counts = curves.CumulativeCounts(np.array([big, 2 * big]), np.array([0, 2 * big]), np.zeros(2, np.int64),
                                     2 * big, 2 * big)
    assert curves.auroc(counts) == pytest.approx(0.75)


def test_curve_bins_of_one_class_only():
    values = np.array([0.5, 1.0, 1.0, 2.0], dtype=np.float32)
    normal_only = curves.curve_bins(histogram_of(values, np.zeros(4, dtype=bool), 16, chunk=4))
    assert normal_only.negatives.tolist() == [4] and normal_only.positives.tolist() == [0]
    assert normal_only.distinct == 3
    anomalous_only = curves.curve_bins(histogram_of(values, np.ones(4, dtype=bool), 16, chunk=4))
    assert anomalous_only.positives.tolist() == [1, 2, 1] and anomalous_only.negatives.tolist() == [0, 0, 0]
    empty = curves.curve_bins(CollapsingHistogram(16))
    assert empty.distinct == 0 and len(empty.negatives) == 0
