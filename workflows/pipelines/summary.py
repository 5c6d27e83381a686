"""The summary table of a lodo run: per (held-out dataset, method, k) mean and std over seeds."""

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
    rows = []
    for (dataset, method, k), runs in sorted(grouped.items()):
        row: dict = {"dataset": dataset, "method": method, "k": k, "seeds": len(runs)}
        over_seeds = summarize_runs([{m: r.get(m) for m in METRIC_NAMES} for r in runs])
        for metric in METRIC_NAMES:
            row[f"{metric}_mean"] = over_seeds["mean"].get(metric)
            row[f"{metric}_std"] = over_seeds["std"].get(metric)
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
    """Metrics in percent as `mean ± std` (`mean` alone for one seed); `n/a` where a metric is not
    defined (e.g. pixel metrics of a dataset without masks)."""
    header = ["dataset", "method", "k", "seeds", *METRIC_NAMES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["dataset"], row["method"], str(row["k"]), str(row["seeds"])]
        for metric in METRIC_NAMES:
            mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
            if mean is None:
                cells.append("n/a")
            else:
                cells.append(f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
