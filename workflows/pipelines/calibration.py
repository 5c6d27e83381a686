"""Per-category flag thresholds: at a target false-positive rate on held-out normals, a fixed score, or
given per category (a file, or an earlier scan's calibration: `scan_thresholds`).

An image is flagged when its score is strictly above its category's threshold. At a target FPR `f`
over `n` normal scores, the threshold is the (floor(f * n) + 1)-th largest score, so at most
floor(f * n) of the calibration normals are above it (empirical FPR <= f, ties aside).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

DEFAULT_TARGET_FPR = 0.01


@dataclass(frozen=True)
class CategoryThreshold:
    category: str
    threshold: float | None  # None: no calibration data for this category (scored, never flagged)
    source: str  # "fpr" | "fixed" | "file" (--thresholds) | "run" (--thresholds-from) | "none"
    normals: int = 0  # calibration images scored
    empirical_fpr: float | None = None  # fraction of calibration normals above the threshold
    normal_median: float | None = None  # median score of the calibration normals (overlay colour scale)


@dataclass
class Calibration:
    """The thresholds of a scan and how they were obtained (stored with its results)."""

    target_fpr: float | None
    fixed_threshold: float | None
    normals_url: str | None
    method: dict
    backbone: dict
    categories: dict[str, CategoryThreshold] = field(default_factory=dict)
    thresholds_file: str | None = None  # --thresholds: entries with source "file" come from it
    thresholds_from: str | None = None  # --thresholds-from: entries with source "run" come from it

    def thresholds(self) -> dict[str, float | None]:
        return {name: entry.threshold for name, entry in self.categories.items()}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["categories"] = {name: asdict(entry) for name, entry in sorted(self.categories.items())}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        entries = {name: CategoryThreshold(**entry) for name, entry in data.get("categories", {}).items()}
        return cls(data["target_fpr"], data["fixed_threshold"], data["normals_url"], data["method"],
                   data["backbone"], entries, data.get("thresholds_file"), data.get("thresholds_from"))


def threshold_at_fpr(scores, target_fpr: float) -> float:
    """The smallest order statistic with at most floor(target_fpr * n) scores strictly above it."""
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if values.size == 0:
        raise ValueError("cannot calibrate a threshold without any normal scores")
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target FPR must be in [0, 1), got {target_fpr}")
    allowed = math.floor(target_fpr * values.size + 1e-9)
    return float(values[min(allowed, values.size - 1)])


def calibrate(category_scores: dict[str, np.ndarray], categories: list[str], *, target_fpr: float,
              base: Calibration) -> Calibration:
    """Thresholds at `target_fpr` for every category with normal scores; the rest get none."""
    for name in categories:
        scores = np.asarray(category_scores.get(name, []), dtype=np.float64)
        if scores.size == 0:
            base.categories[name] = CategoryThreshold(name, None, "none")
            continue
        threshold = threshold_at_fpr(scores, target_fpr)
        base.categories[name] = CategoryThreshold(
            name, threshold, "fpr", int(scores.size), float((scores > threshold).mean()),
            float(np.median(scores)))
    return base


def fixed(categories: list[str], threshold: float, base: Calibration) -> Calibration:
    for name in categories:
        base.categories[name] = CategoryThreshold(name, float(threshold), "fixed")
    return base
