"""ROC, precision-recall and PRO curves from binned counts, and the metrics defined on them.

Thresholds are the occupied bins, highest first; a bin acts as one threshold, exactly as
scikit-learn groups tied scores. With shift 0 every bin is one float64 value, so the results equal the
sort-based computations up to float64 rounding.

The metrics are computed on ``curve_bins``: consecutive bins holding only normal samples are summed into
one, since along such a run the TPR and the region overlap stay constant while the FPR grows (each
trapezoid is a rectangle of the same height, F1 only falls, AP's recall does not move). Anomalous samples
are few, so the curves have at most 2x as many points as anomalous bins instead of one per distinct
score (about 10x fewer for pixels), and no union of the two classes' keys is sorted. AUROC is summed in
integers and AP with `math.fsum`, so they, F1max and the error bounds are the same numbers either way;
AUPRO's float trapezoids differ in rounding only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from residual_core.metrics.histogram import OVERLAP_BITS, AlignedBins, CollapsingHistogram

INT64_LIMIT = 1 << 63


@dataclass(frozen=True)
class CurveBins:
    """Bins of ascending score for the curves: every bin holding anomalous samples, and between two of
    them (and below the first, above the last) the normal-only bins summed into one."""

    shift: int  # the histogram's resolution
    distinct: int  # occupied bins of the data (the union of both classes' keys)
    negatives: np.ndarray  # int64
    positives: np.ndarray  # int64
    overlap: np.ndarray  # int64, units of 2**-OVERLAP_BITS region


def curve_bins(histogram: CollapsingHistogram) -> CurveBins:
    """The histogram's ``CurveBins``: one cumulative sum over the normal bins and a binary search of each
    anomalous key in them (``aligned()`` places every normal bin on the union of both classes' keys
    instead)."""
    histogram.consolidate()  # both classes at one shift
    normal, anomalous = histogram.normal, histogram.anomalous
    below = np.zeros(len(normal) + 1, dtype=np.int64)  # normal count below each normal bin
    np.cumsum(normal.counts, out=below[1:])
    first = np.searchsorted(normal.keys, anomalous.keys, side="left")
    after = np.searchsorted(normal.keys, anomalous.keys, side="right")  # first + 1 where the key is shared
    previous_after = np.concatenate([[0], after[:-1]])
    above_last = below[-1] - (below[after[-1]] if len(after) else 0)
    between = np.append(below[first] - below[previous_after], above_last)
    size = 2 * len(anomalous) + 1  # runs of normal-only bins at even, anomalous bins at odd positions
    negatives = np.empty(size, dtype=np.int64)
    positives, overlap = np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64)
    negatives[0::2], negatives[1::2] = between, below[after] - below[first]
    positives[1::2], overlap[1::2] = anomalous.counts, anomalous.overlap
    occupied = (negatives > 0) | (positives > 0)
    distinct = len(normal) + len(anomalous) - int(np.sum(after - first))
    return CurveBins(normal.shift, distinct, negatives[occupied], positives[occupied], overlap[occupied])


@dataclass(frozen=True)
class CumulativeCounts:
    """Counts at or above each threshold, thresholds from highest to lowest."""

    true_positives: np.ndarray  # int64
    false_positives: np.ndarray  # int64
    overlap: np.ndarray  # int64, units of 2**-OVERLAP_BITS region
    positives: int
    negatives: int

    @classmethod
    def from_bins(cls, bins: AlignedBins | CurveBins) -> CumulativeCounts:
        tps = np.cumsum(bins.positives[::-1])
        fps = np.cumsum(bins.negatives[::-1])
        overlap = np.cumsum(bins.overlap[::-1])
        return cls(tps, fps, overlap, int(tps[-1]) if len(tps) else 0, int(fps[-1]) if len(fps) else 0)


def _with_origin(values: np.ndarray) -> np.ndarray:
    return np.concatenate([[0.0], values.astype(np.float64)])


def auroc(c: CumulativeCounts) -> float:
    """Area under the ROC curve (trapezoids; ties count one half), correctly rounded: the trapezoid sum is
    an integer over 2 P N, summed exactly in int64 (every partial sum is at most 2 P N) and divided once,
    so summing runs of bins (`curve_bins`) or not gives the same number."""
    denominator = 2 * c.positives * c.negatives  # python ints
    if denominator >= INT64_LIMIT:  # P N of ~4.6 x 10^18 and beyond (2 x 10^9 per class): float trapezoids
        fpr = _with_origin(c.false_positives) / c.negatives
        tpr = _with_origin(c.true_positives) / c.positives
        return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)
    false_positive_steps = np.diff(c.false_positives, prepend=0)
    true_positive_pairs = c.true_positives + np.concatenate([[0], c.true_positives[:-1]])
    return int(np.dot(false_positive_steps, true_positive_pairs)) / denominator


def average_precision(c: CumulativeCounts) -> float:
    """scikit-learn's AP: sum over thresholds of (recall step) * precision, no interpolation. The terms are
    summed with `math.fsum` (correctly rounded), so the thresholds without a recall step, which add exact
    zeros, do not change the result (summed runs or every bin: the same number)."""
    tps = c.true_positives.astype(np.float64)
    precision = tps / (tps + c.false_positives)
    recall_step = np.diff(_with_origin(c.true_positives)) / c.positives
    return math.fsum((recall_step * precision).tolist())


def f1_max(c: CumulativeCounts) -> float:
    """Best F1 over thresholds: 2 TP / (2 TP + FP + FN) = 2 TP / (TP + FP + P)."""
    tps = c.true_positives.astype(np.float64)
    return float(np.max(2.0 * tps / (tps + c.false_positives + c.positives)))


def area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x nondecreasing) on [x[0], limit], interpolating at ``limit``."""
    x0, x1, y0, y1 = x[:-1], x[1:], y[:-1], y[1:]
    inside = x0 < limit
    x0, x1, y0, y1 = x0[inside], x1[inside], y0[inside], y1[inside]
    x1_clipped = np.minimum(x1, limit)
    width = x1 - x0
    fraction = np.divide(x1_clipped - x0, width, out=np.ones_like(width), where=width > 0)
    y1_clipped = y0 + fraction * (y1 - y0)
    return float(np.sum((x1_clipped - x0) * (y0 + y1_clipped)) / 2.0)


def aupro(c: CumulativeCounts, regions: int, limit: float = 0.3) -> float:
    """Area under PRO vs FPR on [0, limit], divided by ``limit`` (1.0 is perfect)."""
    fpr = _with_origin(c.false_positives) / c.negatives
    pro = _with_origin(c.overlap) / (float(regions) * 2.0**OVERLAP_BITS)
    return area_up_to(fpr, pro, limit) / limit


def error_bounds(c: CumulativeCounts, regions: int | None, limit: float = 0.3) -> dict[str, float]:
    """Worst-case error of each metric when bins merge distinct scores (certified, from the counts alone).

    Inside bin b the unseen thresholds move TP from tp[b-1] to tp[b] and FP from fp[b-1] to fp[b]:
    AUROC and AUPRO can change by at most half the bin's rectangle (the trapezoid is its midpoint; the
    whole rectangle for the bin cut by the AUPRO limit),
    F1 by at most max 2 tp[b] / (tp[b] + fp[b-1] + P) minus the best boundary F1, and AP by the spread
    of precision inside each bin times the bin's recall step.

    Only bins holding anomalous samples can contribute (elsewhere TP and the overlap do not move, and F1
    only falls as FP grows), so the arrays are those bins' only: memory follows the anomalous bins.
    """
    tp, fp = c.true_positives, c.false_positives
    bins = np.flatnonzero(np.diff(tp, prepend=0) > 0)
    previous = bins - 1
    first = previous < 0
    previous[first] = 0

    def edges(cumulative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo = cumulative[previous].astype(np.float64)
        lo[first] = 0.0
        return cumulative[bins].astype(np.float64), lo

    (tp_hi, tp_lo), (fp_hi, fp_lo) = edges(tp), edges(fp)
    positives, negatives = float(c.positives), float(c.negatives)
    bounds = {"auroc": float(np.sum((fp_hi - fp_lo) * (tp_hi - tp_lo)) / (2 * positives * negatives))}
    precision = tp_hi / (tp_hi + fp_hi)
    best_inside = tp_hi / np.maximum(tp_hi + fp_lo, 1.0)
    worst_inside = (tp_lo + 1) / (tp_lo + 1 + fp_hi)
    spread = np.maximum(best_inside - precision, precision - worst_inside)
    bounds["ap"] = float(np.sum((tp_hi - tp_lo) / positives * spread))
    bounds["f1max"] = float(np.max(2 * tp_hi / (tp_hi + fp_lo + positives), initial=0.0) - f1_max(c))
    if regions:
        fpr_hi, fpr_lo = fp_hi / negatives, fp_lo / negatives
        pro_hi, pro_lo = edges(c.overlap)
        scale = float(regions) * 2.0**OVERLAP_BITS
        below = fpr_lo < limit
        width = np.minimum(fpr_hi, limit) - fpr_lo
        share = np.where(fpr_hi > limit, 1.0, 0.5)  # the bin cut by the limit: interpolation is no midpoint
        bounds["aupro"] = float(np.sum((width * ((pro_hi - pro_lo) / scale) * share)[below]) / limit)
    return bounds
