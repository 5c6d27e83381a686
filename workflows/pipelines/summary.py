"""Summary tables of evaluations: per (dataset, method, k), and per (dataset, category, defect type,
method, k), each metric's mean and std over seeds."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from residual_core.metrics import summarize_runs
from workflows.pipelines.evaluate import METRIC_NAMES, EvalResult


def summary_rows(results: Iterable[EvalResult]) -> list[dict]:
    """One row per (dataset, method, k): `<metric>_mean`/`<metric>_std` over seeds.

    None where undefined: a metric missing in some seed, or the std of a single seed.
    """
    grouped: dict[tuple[str, str, int], list[dict]] = {}
    for result in results:
        for dataset, metrics in result.per_dataset.items():
            key = (dataset, result.spec.method.name, result.spec.k_shot)
            grouped.setdefault(key, []).append(metrics)
    return [_over_seeds({"dataset": dataset, "method": method, "k": k}, runs)
            for (dataset, method, k), runs in sorted(grouped.items())]


def defect_type_rows(results: Iterable[EvalResult]) -> list[dict]:
    """One row per (dataset, category, defect type, method, k): `<metric>_mean`/`<metric>_std` over seeds
    of that type's images against the category's normals (`EvalResult.per_defect_type`)."""
    grouped: dict[tuple[str, str, str, str, int], list[dict]] = {}
    for result in results:
        for name, by_type in result.per_defect_type.items():
            dataset, category = name.split("/", 1)
            for defect_type, metrics in by_type.items():
                key = (dataset, category, defect_type, result.spec.method.name, result.spec.k_shot)
                grouped.setdefault(key, []).append(metrics)
    return [_over_seeds({"dataset": dataset, "category": category, "defect_type": defect_type,
                         "method": method, "k": k}, runs)
            for (dataset, category, defect_type, method, k), runs in sorted(grouped.items())]


def _over_seeds(row: dict, runs: list[dict]) -> dict:
    """`row` plus the number of seeds and each metric's mean and std over `runs` (None where undefined:
    a metric missing in some seed, or the std of a single seed)."""
    row = {**row, "seeds": len(runs)}
    over_seeds = summarize_runs([{m: r.get(m) for m in METRIC_NAMES} for r in runs])
    for metric in METRIC_NAMES:
        row[f"{metric}_mean"] = over_seeds["mean"].get(metric)
        row[f"{metric}_std"] = over_seeds["std"].get(metric)
    return row


def to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def to_markdown(rows: list[dict]) -> str:
    """Metrics in percent as `mean ± std` (`mean` alone for one seed); `n/a` where a metric is not
    defined (e.g. pixel metrics of a dataset without masks)."""
    return _markdown(rows, ("dataset", "method", "k", "seeds"))


def defect_types_to_markdown(rows: list[dict]) -> str:
    """`defect_type_rows` as a markdown table, formatted as `to_markdown`."""
    return _markdown(rows, ("dataset", "category", "defect_type", "method", "k", "seeds"))


def defect_types_to_csv(rows: list[dict]) -> str:
    """`defect_type_rows` as CSV (empty cells where undefined)."""
    return to_csv(rows)


def _markdown(rows: list[dict], keys: tuple[str, ...]) -> str:
    header = [*keys, *METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[key]) for key in keys]
        for metric in METRIC_NAMES:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            if mean is None:
                cells.append("n/a")
            else:
                cells.append(f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
