"""Exact sort-based reference metrics, written independently of the engine (per-image loops are fine here),
and a bit-for-bit comparison of histogram states."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def f1_max_reference(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return float(np.nanmax(f1))


def sklearn_metrics(labels: np.ndarray, scores: np.ndarray, dtype=np.float32) -> tuple[float, float, float]:
    labels, scores = labels.ravel().astype(int), scores.ravel().astype(dtype)
    return (float(roc_auc_score(labels, scores)), float(average_precision_score(labels, scores)),
            f1_max_reference(labels, scores))


def trapezoid_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """MVTec-style trapezoid integration on [0, x_max], linearly interpolating the curve at x_max."""
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max))
        if 0 < ins < len(x):
            y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
            correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def exact_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """PRO at every threshold (per-region overlap, 8-connected regions per image); area to limit / limit."""
    maps = maps.astype(np.float32)
    masks = masks.astype(bool)
    weights = np.zeros(maps.shape, dtype=np.float64)
    regions = 0
    for i in range(masks.shape[0]):
        labelled, count = ndimage.label(masks[i], structure=np.ones((3, 3)))
        for r in range(1, count + 1):
            region = labelled == r
            weights[i][region] = 1.0 / region.sum()
        regions += count
    scores = maps.ravel()
    order = np.argsort(-scores, kind="stable")
    scores, weights, normal = scores[order], weights.ravel()[order], ~masks.ravel()[order]
    last_of_tie = np.append(scores[1:] != scores[:-1], True)
    fpr = np.cumsum(normal)[last_of_tie] / normal.sum()
    pro = np.cumsum(weights)[last_of_tie] / regions
    return trapezoid_up_to(np.append(0.0, fpr), np.append(0.0, pro), limit) / limit


def assert_same_histogram_state(state: dict, expected: dict) -> None:
    """Bit-identical histogram states: same keys, same values, same dtypes."""
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert_same_histogram_state(state[key], value)
        elif isinstance(value, np.ndarray):
            assert state[key].dtype == value.dtype, key
            np.testing.assert_array_equal(state[key], value, err_msg=key)
        else:
            assert state[key] == value, key
