"""MLflow logging, from the driver only (workers return metrics; they never talk to MLflow).

Tracking URI: MLFLOW_TRACKING_URI, else a sqlite store `mlflow.db` in the working directory, so a
local run needs no server. Layout of a lodo run: one parent run; nested runs per training job and
per (held-out dataset, method, k, seed) evaluation; mean/std over seeds and the summary table
(CSV + Markdown) on the parent.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager

from workflows.storage import redact

MAX_PARAM_CHARS = 6000


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlflow.db')}"


def metric_key(*parts: str) -> str:
    """MLflow metric names allow letters, digits and `_-. /`; anything else becomes `_`."""
    return "/".join(re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(p)) for p in parts if p != "")


def flatten(data: dict, prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"} params (values JSON for lists/dicts, credentials redacted)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
            out[name] = redact(text)[:MAX_PARAM_CHARS]
    return out


class Tracker:
    """Thin wrapper over the mlflow fluent API; `enabled=False` makes every call a no-op."""

    def __init__(self, experiment: str, enabled: bool = True) -> None:
        self.enabled = enabled
        if not enabled:
            return
        import mlflow

        self.mlflow = mlflow
        mlflow.set_tracking_uri(tracking_uri())
        mlflow.set_experiment(experiment)

    @contextmanager
    def run(self, name: str, *, nested: bool = False, tags: dict | None = None):
        if not self.enabled:
            yield None
            return
        with self.mlflow.start_run(run_name=name, nested=nested, tags=tags or {}) as active:
            yield active

    def params(self, params: dict) -> None:
        if self.enabled and params:
            self.mlflow.log_params(flatten(params))

    def metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.enabled and clean:
            self.mlflow.log_metrics(clean, step=step)

    def loss_history(self, losses: list[tuple[int, dict[str, float]]]) -> None:
        """Per-step training losses in one batch call."""
        if not self.enabled or not losses:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(metric_key("train", name), float(value), now, int(step))
                   for step, values in losses for name, value in values.items()]
        client = self.mlflow.tracking.MlflowClient()
        run_id = self.mlflow.active_run().info.run_id
        for start in range(0, len(entries), 1000):
            client.log_batch(run_id, metrics=entries[start:start + 1000])

    def text(self, text: str, artifact_file: str) -> None:
        if self.enabled:
            self.mlflow.log_text(text, artifact_file)

    def json(self, payload, artifact_file: str) -> None:
        if self.enabled:
            self.mlflow.log_dict(payload, artifact_file)

    def file(self, local_path: str, artifact_path: str | None = None) -> None:
        if self.enabled:
            self.mlflow.log_artifact(local_path, artifact_path)


def eval_metrics(per_category: dict[str, dict], per_dataset: dict[str, dict],
                 metric_names) -> dict[str, float]:
    """`<dataset>/<category>/<metric>` and `<dataset>/<metric>` metric keys (defined values only)."""
    out = {}
    for name, metrics in per_category.items():
        dataset, category = name.split("/", 1)
        for metric in metric_names:
            if isinstance(metrics.get(metric), (int, float)):
                out[metric_key(dataset, category, metric)] = metrics[metric]
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
