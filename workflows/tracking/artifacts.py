"""What an evaluation run carries besides its params: metric keys, the per-image results table and the
report pictures (curves, galleries), all read from the job's committed outputs on storage."""

from __future__ import annotations

import os
import tempfile
import warnings

from workflows.storage import redact
from workflows.tracking.client import Tracker, metric_key


def eval_metrics(per_category: dict[str, dict], per_dataset: dict[str, dict], metric_names,
                 per_defect_type: dict[str, dict[str, dict]] | None = None) -> dict[str, float]:
    """`<dataset>/<category>/<metric>`, `<dataset>/<metric>` and, per defect type,
    `<dataset>/<category>/<type>/<metric>` metric keys (defined values only)."""
    out = {}
    for name, metrics in per_category.items():
        dataset, category = name.split("/", 1)
        for metric in metric_names:
            if isinstance(metrics.get(metric), (int, float)):
                out[metric_key(dataset, category, metric)] = metrics[metric]
    for name, types in (per_defect_type or {}).items():
        dataset, category = name.split("/", 1)
        for defect_type, metrics in types.items():
            for metric in metric_names:
                if isinstance(metrics.get(metric), (int, float)):
                    out[metric_key(dataset, category, defect_type, metric)] = metrics[metric]
    for dataset, metrics in per_dataset.items():
        for metric in metric_names:
            if metrics.get(metric) is not None:
                out[metric_key(dataset, metric)] = metrics[metric]
    return out


def log_results_table(tracker: Tracker, job_url: str, artifact_file: str = "results.parquet") -> None:
    """Copy a job's per-image results (streamed shard by shard) into one Parquet artifact."""
    if not tracker.enabled:
        return
    import io

    import pyarrow.parquet as pq

    from workflows import storage
    from workflows.pipelines.commits import ShardStore

    store = ShardStore(job_url)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, artifact_file)
        writer = None
        for sid in sorted(store.done_ids()):
            data = storage.read_bytes(storage.join(job_url, "results", f"{sid}.parquet"))
            table = pq.read_table(io.BytesIO(data))
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema, compression="zstd")
            writer.write_table(table.cast(writer.schema) if table.schema != writer.schema else table)
        if writer is not None:
            writer.close()
            tracker.file(path)


def log_evaluation_reports(tracker: Tracker, job_url: str, *, per_group: int = 4) -> list:
    """Write the job's reports (`workflows.reports.evaluation`) to a temporary directory and log them as
    artifacts of the active run (``curves/``, ``gallery/``; ``curves/<stem>_missing.txt`` says why a
    curve is absent). A failure is a warning: pictures never fail an evaluation whose metrics are
    already logged. Returns the `CategoryReport`s ([] when tracking is off or the reports failed)."""
    if not getattr(tracker, "enabled", False):
        return []
    try:
        from workflows.reports.evaluation import write_evaluation_reports

        with tempfile.TemporaryDirectory(prefix="residual-ad-reports-") as tmp:
            reports = write_evaluation_reports(job_url, tmp, per_group=per_group)
            for report in reports:
                if report.missing:
                    lines = [f"{figure}: {reason}" for figure, reason in sorted(report.missing.items())]
                    tracker.text("\n".join(lines) + "\n", f"curves/{report.stem}_missing.txt")
                for artifact, path in report.files.items():
                    tracker.file(path, os.path.dirname(artifact))
            return reports
    except Exception as exc:  # noqa: BLE001 - see docstring
        warnings.warn(redact(f"reports for {job_url}: {type(exc).__name__}: {exc}"), stacklevel=2)
        return []
