"""Aggregation of ``MetricAccumulator.compute()`` results: per dataset (mean over categories) and over
repeated runs (mean and sample standard deviation over seeds). A value that cannot be formed honestly
is ``None`` with a reason under ``not_defined``, never a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

RESERVED_KEYS = ("not_defined", "counts", "resolution")


def metric_names(results: Sequence[Mapping]) -> list[str]:
    """Metric names in first-seen order (keys that are not bookkeeping)."""
    names: list[str] = []
    for result in results:
        names.extend(k for k in result if k not in RESERVED_KEYS and k not in names)
    return names


def summarize_dataset(per_category: Mapping[str, Mapping]) -> dict:
    """Mean over categories of each metric, over the categories where it is defined.

    Categories where a metric is not defined are listed under ``excluded[metric]`` with their reason, so a
    dataset mean over fewer categories is visible as such.
    """
    if not per_category:
        raise ValueError("summarize_dataset needs at least one category")
    names = metric_names(list(per_category.values()))
    out: dict = {"categories": sorted(per_category), "not_defined": {}, "excluded": {}}
    for name in names:
        values = {c: r.get(name) for c, r in per_category.items()}
        defined = [v for v in values.values() if v is not None]
        excluded = {c: r.get("not_defined", {}).get(name, "missing") for c, r in per_category.items()
                    if values[c] is None}
        if excluded:
            out["excluded"][name] = excluded
        if defined:
            out[name] = sum(defined) / len(defined)
        else:
            out[name] = None
            out["not_defined"][name] = "not defined in any category"
    return out


def summarize_runs(per_run: Sequence[Mapping]) -> dict:
    """Mean and sample standard deviation (ddof=1) of each metric over runs (seeds).

    A metric missing from some runs is not defined (mixing would bias the mean); the standard deviation
    needs two runs.
    """
    if not per_run:
        raise ValueError("summarize_runs needs at least one run")
    out: dict = {"runs": len(per_run), "mean": {}, "std": {}, "not_defined": {}}
    for name in metric_names(per_run):
        values = [r.get(name) for r in per_run]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            out["mean"][name] = out["std"][name] = None
            out["not_defined"][name] = f"not defined in runs {missing}"
            continue
        mean = sum(values) / len(values)
        out["mean"][name] = mean
        if len(values) < 2:
            out["std"][name] = None
            out["not_defined"][f"std:{name}"] = "standard deviation needs at least two runs"
        else:
            out["std"][name] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return out
