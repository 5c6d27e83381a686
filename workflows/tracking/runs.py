"""One function per kind of MLflow run. The commands and pipelines call them with live results, and
`log-results` with the same objects loaded from storage, so both log the same params, metrics and
artifacts for a kind of run.

Layouts:
- train (`log_train_run`): one run per training job: method, train datasets, seed, checkpoint, losses
  (`train/<loss>` per step), `contributions.json`, `reference_ids.json`.
- evaluation (`log_evaluation_run`, top-level or nested): spec, k, seed, `results_url` (the job), reference
  ids; `<dataset>/<metric>`, `<dataset>/<category>/<metric>` (and per defect type where the job has
  them), image counts; `metrics.json`, `results.parquet`, `curves/` and `gallery/` PNGs.
- evaluate parent (`log_evaluate_parent`, tag `kind=evaluations`): "evaluate <datasets> <method>" with
  the config, backbone identity and `results_url` (the summary folder), one nested evaluation run per
  (k, seed), mean/std over seeds as `<dataset>/<method>/k<k>/<metric>_<mean|std>` and the summary
  tables (`summary.csv`, `summary.md`, ...) as artifacts.
- lodo parent (`log_lodo_parent`, tag `kind=lodo`): "lodo <datasets>", the same plus source groups,
  folds and dataset versions; nested training runs and nested evaluation runs per (held-out dataset,
  method, k, seed).
- scan (`log_scan_run`): options, thresholds, counts, `scan_summary.json`.
`logged_from=True` (log-results) tags every run with the URL it was logged from.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from typing import TYPE_CHECKING

from workflows.storage import redact
from workflows.tracking.artifacts import eval_metrics, log_evaluation_reports, log_results_table
from workflows.tracking.client import Tracker

if TYPE_CHECKING:
    from workflows.pipelines.evaluate import EvalResult
    from workflows.pipelines.summary_folder import SummaryRecord
    from workflows.pipelines.train import TrainResult

STATS = ("mean", "std")
# `kind` tag of a summary folder's parent run (nested evaluation runs are tagged `evaluate`)
PARENT_KINDS = {"evaluate": "evaluations", "lodo": "lodo"}
# what an evaluation run's `metrics.json` artifact holds (the same live and from storage)
METRICS_FILE_KEYS = ("spec", "per_category", "per_dataset", "counts", "reference_ids")


def _tags(kind: str, url: str, logged_from: bool, extra: dict | None = None) -> dict:
    tags = {"kind": kind, **(extra or {})}
    if logged_from:
        tags["logged_from"] = redact(url)
    return tags


def train_run_name(spec, label: str = "") -> str:
    return f"train {spec.method.name} seed={spec.seed}" + (f" {label}" if label else "")


def log_train_run(tracker: Tracker, result: TrainResult, *, context: dict | None = None, label: str = "",
                  nested: bool = False, logged_from: bool = False, live: bool = False) -> None:
    """One training job; `context`: params shared with the command (config, backbone identity).
    `live=True`: complete the run `live_train_run` opened (its steps were logged while training ran;
    a reused checkpoint streamed none, so its stored losses are logged here)."""
    spec = result.spec

    def log() -> None:
        tracker.params({**(context or {}), "method": asdict(spec.method),
                        "train_datasets": list(spec.datasets), "seed": spec.seed,
                        "checkpoint": result.checkpoint, "reused": result.reused})
        if not live or result.reused:
            tracker.loss_history(result.losses)
        tracker.json(result.contributions, "contributions.json")
        tracker.json(result.reference_ids, "reference_ids.json")

    if live:
        log()
        return
    with tracker.run(train_run_name(spec, label), nested=nested,
                     tags=_tags("train", result.checkpoint, logged_from)):
        log()


@contextmanager
def live_train_run(tracker: Tracker, spec):
    """A training run opened before its training starts; yields `on_steps(steps)`, which logs each batch
    of steps (`train/<loss>` at its step) as the task streams them. Finish it with
    `log_train_run(..., live=True)` inside the block; a failing training ends the run FAILED."""
    with tracker.run(train_run_name(spec), tags=_tags("train", "", False)):
        yield tracker.loss_history


def eval_run_name(result: EvalResult) -> str:
    spec = result.spec
    return f"eval {'+'.join(spec.datasets)} {spec.method.name} k={spec.k_shot} seed={spec.seed}"


def log_evaluation_run(tracker: Tracker, result: EvalResult, *, context: dict | None = None,
                       tags: dict | None = None, training: TrainResult | None = None, nested: bool = False,
                       logged_from: bool = False) -> None:
    """One evaluation job; `context`: params shared with the command or the fold (config, backbone
    identity; lodo: holdout, train datasets, dataset version); `training`: the training it evaluates."""
    from workflows.pipelines.evaluate import METRIC_NAMES

    stored = result.to_dict()
    with tracker.run(eval_run_name(result), nested=nested,
                     tags=_tags("evaluate", result.job_url, logged_from, tags)):
        tracker.params({**(context or {}), "spec": stored["spec"], "k_shot": result.spec.k_shot,
                        "seed": result.spec.seed, "results_url": result.job_url,
                        "reference_ids": result.reference_ids})
        per_defect_type = getattr(result, "per_defect_type", None) or {}
        tracker.metrics(eval_metrics(result.per_category, result.per_dataset, METRIC_NAMES, per_defect_type))
        tracker.metrics({"images": result.counts.get("images", 0),
                         "skipped_images": result.counts.get("skipped", 0)})
        metrics_file = {key: stored[key] for key in METRICS_FILE_KEYS}
        if per_defect_type:
            metrics_file["per_defect_type"] = per_defect_type
        tracker.json(metrics_file, "metrics.json")
        if training is not None:
            tracker.json(training.contributions, "train_contributions.json")
        log_results_table(tracker, result.job_url)
        log_evaluation_reports(tracker, result.job_url)  # curves/ and gallery/ PNGs


def summary_metrics(rows: list[dict]) -> dict[str, float]:
    """`<dataset>/<method>/k<k>/<metric>_<mean|std>` of the summary rows (defined values only)."""
    from workflows.pipelines.evaluate import METRIC_NAMES

    out = {}
    for row in rows:
        for metric in METRIC_NAMES:
            for stat in STATS:
                value = row[f"{metric}_{stat}"]
                if value is not None:
                    key = f"{row['dataset']}/{row['method']}/k{row['k']}/{metric}_{stat}"
                    out[key.replace("@", "_")] = value
    return out


def _log_parent(tracker: Tracker, record: SummaryRecord, logged_from: bool) -> str | None:
    """The parent run of a summary folder and its nested runs; returns the parent's run id."""
    nested_config = {"config": record.config} if record.kind == "evaluate" else {}
    with tracker.run(record.name, tags=_tags(PARENT_KINDS[record.kind], record.url, logged_from)) as parent:
        tracker.params({"config": record.config, **record.params, "results_url": record.url})
        for entry in record.trainings:
            log_train_run(tracker, entry.result, context=entry.params, label=entry.label, nested=True,
                          logged_from=logged_from)
        for entry in record.evaluations:
            log_evaluation_run(tracker, entry.result, context={**nested_config, **entry.params},
                               tags=entry.tags, training=entry.training, nested=True, logged_from=logged_from)
        tracker.metrics(summary_metrics(record.rows))
        for name, text in record.tables.items():
            tracker.text(text, name)
        return parent.info.run_id if parent is not None else None


def log_evaluate_parent(tracker: Tracker, record: SummaryRecord, *, logged_from: bool = False) -> str | None:
    """`evaluate`: one parent run, one nested run per (k, seed); see the module docstring."""
    return _log_parent(tracker, record, logged_from)


def log_lodo_parent(tracker: Tracker, record: SummaryRecord, *, logged_from: bool = False) -> str | None:
    """`lodo`: one parent run, nested training and evaluation runs; see the module docstring."""
    return _log_parent(tracker, record, logged_from)


def log_summary_folder(tracker: Tracker, record: SummaryRecord, *, logged_from: bool = False) -> str | None:
    """The parent run of a summary folder of either kind."""
    log = log_evaluate_parent if record.kind == "evaluate" else log_lodo_parent
    return log(tracker, record, logged_from=logged_from)


def log_scan_run(tracker: Tracker, config: dict, summary: dict, *, logged_from: str | None = None) -> None:
    """One run per scan: options, thresholds and counts (`summary`: the scan's `summary.json`)."""
    tags = {"kind": "scan", **({"logged_from": redact(logged_from)} if logged_from else {})}
    with tracker.run(f"scan {summary['options']['output']}", tags=tags):
        thresholds = {c: e["threshold"] for c, e in summary["calibration"]["categories"].items()}
        tracker.params({"config": config, "scan": summary["options"], "thresholds": thresholds})
        metrics = {key: summary[key] for key in ("seen", "scored", "skipped", "flagged", "flagged_fraction")}
        metrics["throughput_images_per_s"] = summary["throughput_images_per_s"]
        for category, counts in summary["per_category"].items():
            metrics.update({f"{key}/{category}": value for key, value in counts.items()})
        tracker.metrics(metrics)
        tracker.json(summary, "scan_summary.json")
