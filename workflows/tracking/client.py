"""The MLflow client of residual-ad: `Tracker`, from the driver only (workers return metrics; they never
talk to MLflow). What each kind of run logs is in `workflows.tracking.runs`.

Tracking URI: MLFLOW_TRACKING_URI, else a sqlite store `mlflow.db` in the working directory, so a
local run needs no server.

MLflow never fails a run whose results are committed on storage: the first MLflow error (server down,
unreachable, failing) prints one warning line naming the `residual-ad log-results URL` command that logs
the stored results later, and the tracker turns itself off for the rest of the command. Requests are
bounded (`MLFLOW_HTTP_REQUEST_TIMEOUT`, `MLFLOW_HTTP_REQUEST_MAX_RETRIES`,
`MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`; defaults in `REQUEST_BOUNDS` unless set in the environment).
`log-results` itself uses `required=True`: there an MLflow error is the command's error.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager

from workflows import redaction
from workflows.storage import redact

# MLflow client request bounds (mlflow's own defaults: 120 s timeout, 7 retries with backoff factor 2,
# i.e. minutes per call against a dead server); an environment value wins
REQUEST_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}

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


def bound_requests() -> None:
    """Bounded MLflow client requests for this process (see `REQUEST_BOUNDS`; the environment wins)."""
    for name, value in REQUEST_BOUNDS.items():
        os.environ.setdefault(name, value)


def _short(text: str, limit: int = 300) -> str:
    """One line of at most `limit` characters: its start and its end (where the cause usually is)."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    return line if len(line) <= limit else f"{line[:limit - 100]} ... {line[-95:]}"


class TrackingError(RuntimeError):
    """MLflow failed where logging is the job (`log-results`); the message is redacted."""


class Tracker:
    """Thin wrapper over the mlflow fluent API; `enabled=False` makes every call a no-op.

    `results_url`: where the results of this command are committed; on the first MLflow failure one
    warning line says to run `residual-ad log-results <results_url>` later, and the tracker disables
    itself (`failure` holds the reason). `required=True` raises `TrackingError` instead."""

    def __init__(self, experiment: str, enabled: bool = True, *, results_url: str | None = None,
                 required: bool = False) -> None:
        self.enabled = enabled
        self.results_url = results_url
        self.required = required
        self.failure: str | None = None
        if not enabled:
            return
        bound_requests()
        redaction.register_urls_in(tracking_uri())
        import mlflow

        self.mlflow = mlflow
        self._guard(lambda: (mlflow.set_tracking_uri(tracking_uri()), mlflow.set_experiment(experiment)))

    def _guard(self, call, default=None):
        """Run one MLflow call; a failure degrades the tracker (or raises when `required`)."""
        if not self.enabled:
            return default
        try:
            return call()
        except Exception as exc:  # noqa: BLE001 - any MLflow failure: the results are on storage
            reason = redact(f"{type(exc).__name__}: {_short(str(exc))}")
            if self.required:
                raise TrackingError(f"MLflow at {redact(tracking_uri())}: {reason}") from None
            self._degrade(reason)
            return default

    def _degrade(self, reason: str) -> None:
        self.enabled = False
        self.failure = reason
        later = (f"`residual-ad log-results {redact(self.results_url)}`" if self.results_url
                 else "`residual-ad log-results <output URL>`")
        print(f"warning: MLflow tracking failed at {redact(tracking_uri())} ({reason}); the results are "
              f"committed on storage: log them later with {later}", file=sys.stderr, flush=True)
        self._end_active_runs()

    def _end_active_runs(self) -> None:
        """Leave no run on mlflow's active-run stack (a later command in this process starts clean);
        one quick attempt each to mark them failed on the server."""
        saved = {name: os.environ.get(name) for name in REQUEST_BOUNDS}
        os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"})
        try:
            for _ in range(100):
                if self.mlflow.active_run() is None:
                    break
                try:
                    self.mlflow.end_run("FAILED")  # pops the run before it talks to the server
                except Exception:  # noqa: BLE001, S110 - the server is failing: that is why we are here
                    pass
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    @contextmanager
    def run(self, name: str, *, nested: bool = False, tags: dict | None = None):
        clean = {key: redact(value) for key, value in (tags or {}).items()}
        active = self._guard(lambda: self.mlflow.start_run(run_name=redact(name), nested=nested, tags=clean))
        if active is None:
            yield None
            return
        try:
            yield active
        except BaseException:
            self._guard(lambda: self.mlflow.end_run("FAILED"))
            raise
        self._guard(self.mlflow.end_run)

    def params(self, params: dict) -> None:
        if self.enabled and params:
            self._guard(lambda: self.mlflow.log_params(flatten(params)))

    def metrics(self, metrics: dict[str, float | None], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.enabled and clean:
            self._guard(lambda: self.mlflow.log_metrics(clean, step=step))

    def loss_history(self, losses: list[tuple[int, dict[str, float]]]) -> None:
        """Per-step training losses in one batch call."""
        if not self.enabled or not losses:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(metric_key("train", name), float(value), now, int(step))
                   for step, values in losses for name, value in values.items()]

        def log() -> None:
            client = self.mlflow.tracking.MlflowClient()
            run_id = self.mlflow.active_run().info.run_id
            for start in range(0, len(entries), 1000):
                client.log_batch(run_id, metrics=entries[start:start + 1000])

        self._guard(log)

    def text(self, text: str, artifact_file: str) -> None:
        self._guard(lambda: self.mlflow.log_text(redact(text), artifact_file))

    def json(self, payload, artifact_file: str) -> None:
        self._guard(lambda: self.mlflow.log_text(redact(json.dumps(payload, indent=2, default=str)),
                                                 artifact_file))

    def file(self, local_path: str, artifact_path: str | None = None) -> None:
        self._guard(lambda: self.mlflow.log_artifact(local_path, artifact_path))

    def search_runs(self, filter_string: str, max_results: int = 1) -> list:
        """Runs of the current experiment matching `filter_string` (empty when disabled or failing)."""
        found = self._guard(lambda: self.mlflow.search_runs(
            filter_string=filter_string, max_results=max_results, output_format="list"), default=[])
        return found or []

