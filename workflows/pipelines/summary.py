"""The summary table of a lodo run: per (held-out dataset, method, k) mean and std over seeds."""

from __future__ import annotations

import csv
import io
import statistics
from collections.abc import Iterable

from workflows.pipelines.evaluate import METRIC_NAMES, EvalResult


def summary_rows(results: Iterable[EvalResult]) -> list[dict]:
    """One row per (dataset, method, k): `<metric>_mean`/`<metric>_std` over seeds (None if undefined)."""
    grouped: dict[tuple[str, str, int], list[dict]] = {}
    for result in results:
        for dataset, metrics in result.per_dataset.items():
            key = (dataset, result.spec.method.name, result.spec.k_shot)
            grouped.setdefault(key, []).append(metrics)
    rows = []
    for (dataset, method, k), runs in sorted(grouped.items()):
        row: dict = {"dataset": dataset, "method": method, "k": k, "seeds": len(runs)}
        for metric in METRIC_NAMES:
            values = [r[metric] for r in runs if r.get(metric) is not None]
            row[f"{metric}_mean"] = statistics.fmean(values) if values else None
            row[f"{metric}_std"] = statistics.pstdev(values) if len(values) > 1 else (0.0 if values else None)
        rows.append(row)
    return rows


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
    """Metrics in percent as `mean ± std`; `n/a` where a metric is not defined (e.g. pixel metrics
    of a dataset without masks)."""
    header = ["dataset", "method", "k", "seeds", *METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["dataset"], row["method"], str(row["k"]), str(row["seeds"])]
        for metric in METRIC_NAMES:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            cells.append("n/a" if mean is None else f"{100 * mean:.1f} ± {100 * (std or 0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
