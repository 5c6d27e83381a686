"""Curve points for plotting (ROC at image and pixel level, PRO) from a ``MetricAccumulator``.

Read-only views of the accumulator's binned counts: the same thresholds as the metrics, thinned to at
most ``max_points`` points along the curve's length so that a plot stays small whatever the number of
bins. The areas come from ``compute()``, so a legend shows exactly the logged metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from residual_core.metrics import curves
from residual_core.metrics.accumulator import MetricAccumulator, pixel_metric_names
from residual_core.metrics.histogram import OVERLAP_BITS


@dataclass(frozen=True)
class CurvePoints:
    """One curve: ``x`` (false-positive rate) and ``y`` (TPR or PRO), both from (0, 0) upwards.

    When the curve is not defined (one class missing, no masks) ``x`` and ``y`` are empty and
    ``undefined_reason`` says why."""

    x: np.ndarray
    y: np.ndarray
    area: float | None
    metric: str  # the metric the area is, e.g. "I-AUROC", "AUPRO@0.3"
    undefined_reason: str | None = None
    limit: float = 1.0  # FPR range the area integrates (AUPRO's limit)

    @property
    def defined(self) -> bool:
        return self.undefined_reason is None


def thin_polyline(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` vertices, evenly spaced along the (L1) length; ends always kept."""
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}")
    if len(x) <= max_points:
        return x, y
    step = np.abs(np.diff(x)) + np.abs(np.diff(y))
    length = np.concatenate([[0.0], np.cumsum(step)])
    total = length[-1]
    if total <= 0:
        return x[[0, -1]], y[[0, -1]]
    bucket = np.floor(length * ((max_points - 1) / total)).astype(np.int64)
    keep = np.flatnonzero(np.diff(bucket, prepend=-1) != 0)
    keep = np.union1d(keep, [len(x) - 1])
    return x[keep], y[keep]


def _undefined(metric: str, reason: str, limit: float = 1.0) -> CurvePoints:
    return CurvePoints(np.zeros(0), np.zeros(0), None, metric, reason, limit)


def _counts(acc: MetricAccumulator, level: str) -> curves.CumulativeCounts:
    if level == "image":
        return curves.CumulativeCounts.from_bins(acc.image_hist.aligned())
    return curves.CumulativeCounts.from_bins(acc.pixel_hist.aligned())


def roc_curve_points(acc: MetricAccumulator, level: str = "image", *, max_points: int = 1000,
                     computed: dict | None = None) -> CurvePoints:
    """ROC (FPR, TPR) at ``level`` "image" or "pixel". ``computed``: ``acc.compute()`` if already known."""
    if level not in ("image", "pixel"):
        raise ValueError(f"level must be 'image' or 'pixel', got {level!r}")
    metric = "I-AUROC" if level == "image" else "P-AUROC"
    if level == "pixel" and not acc.config.pixel:
        return _undefined(metric, "pixel metrics are switched off for this accumulator")
    computed = computed if computed is not None else acc.compute()
    reason = computed["not_defined"].get(metric)
    if reason:
        return _undefined(metric, reason)
    c = _counts(acc, level)
    fpr = np.concatenate([[0.0], c.false_positives / c.negatives])
    tpr = np.concatenate([[0.0], c.true_positives / c.positives])
    x, y = thin_polyline(fpr, tpr, max_points)
    return CurvePoints(x, y, computed[metric], metric)


def pro_curve_points(acc: MetricAccumulator, *, max_points: int = 1000,
                     computed: dict | None = None) -> CurvePoints:
    """PRO (mean per-region overlap) against pixel FPR over the whole FPR range; ``limit`` and ``area``
    are the accumulator's AUPRO limit and AUPRO (normalised by the limit)."""
    limit = acc.config.aupro_limit
    metric = pixel_metric_names(limit)[3]
    if not acc.config.pixel:
        return _undefined(metric, "pixel metrics are switched off for this accumulator", limit)
    computed = computed if computed is not None else acc.compute()
    reason = computed["not_defined"].get(metric)
    if reason:
        return _undefined(metric, reason, limit)
    c = _counts(acc, "pixel")
    fpr = np.concatenate([[0.0], c.false_positives / c.negatives])
    pro = np.concatenate([[0.0], c.overlap / (float(acc.counts.regions) * 2.0**OVERLAP_BITS)])
    x, y = thin_polyline(fpr, pro, max_points)
    return CurvePoints(x, y, computed[metric], metric, None, limit)
