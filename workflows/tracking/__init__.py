"""MLflow tracking, in one place: the client (`client.py`: `Tracker`, bounded requests, degrade to one
warning), what an evaluation run carries (`artifacts.py`) and one function per kind of run (`runs.py`),
used by the commands, the pipelines and `log-results`. Nothing else in residual-ad talks to MLflow."""

from workflows.tracking.artifacts import eval_metrics, log_evaluation_reports, log_results_table
from workflows.tracking.client import (
    MAX_PARAM_CHARS,
    REQUEST_BOUNDS,
    Tracker,
    TrackingError,
    bound_requests,
    flatten,
    metric_key,
    tracking_uri,
)
from workflows.tracking.runs import (
    eval_run_name,
    live_train_run,
    log_evaluate_parent,
    log_evaluation_run,
    log_lodo_parent,
    log_scan_run,
    log_summary_folder,
    log_train_run,
    summary_metrics,
    train_run_name,
)

__all__ = [
    "MAX_PARAM_CHARS", "REQUEST_BOUNDS", "Tracker", "TrackingError", "bound_requests", "eval_metrics",
    "eval_run_name", "flatten", "live_train_run", "log_evaluate_parent", "log_evaluation_reports",
    "log_evaluation_run", "log_lodo_parent", "log_results_table", "log_scan_run", "log_summary_folder",
    "log_train_run", "metric_key", "summary_metrics", "tracking_uri", "train_run_name",
]
