"""Summary folders of `evaluate` and `lodo`.

`<output>/evaluations/<timestamp>/` (evaluate) and `<output>/lodo/<timestamp>/` (lodo) hold
`config.yaml`, the summary tables (`summary.csv`, `summary.md`: mean ± std over seeds per
dataset/method/k; `defect_types.csv`, `defect_types.md`: the same per category and defect type, where
the results have defect types; `SUMMARY_TABLES` lists the table builders, add one there to get another
file) and `jobs.json` (the parent MLflow run's name and params, and the evaluation jobs and training
checkpoints it summarises with the context of their nested runs). `SummaryRecord` is the same object
whether built from live results or loaded from storage, so `workflows.tracking.log_summary_folder`
logs the same parent/nested layout from the command and from `log-results`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from workflows import storage
from workflows.config import RunConfig, load_config, save_config
from workflows.pipelines.evaluate import EvalResult, stored_eval_result
from workflows.pipelines.summary import (
    defect_type_rows,
    defect_types_to_csv,
    defect_types_to_markdown,
    summary_rows,
    to_csv,
    to_markdown,
)
from workflows.pipelines.train import TrainResult, stored_train_result

JOBS_FILE = "jobs.json"
FOLDER_FORMAT = 1
KIND_DIRS = {"evaluate": "evaluations", "lodo": "lodo"}  # summary-folder kind -> directory under output


def _mean_std_tables(results: list[EvalResult]) -> dict[str, str]:
    rows = summary_rows(results)
    return {"summary.csv": to_csv(rows), "summary.md": to_markdown(rows)}


# table builders: evaluation results -> {file name: text}; every file lands in the folder and on the
# parent MLflow run as an artifact
def _defect_type_tables(results: list[EvalResult]) -> dict[str, str]:
    """Per defect type (its images against the category's normals); none when no result has types."""
    rows = defect_type_rows(results)
    if not rows:
        return {}
    return {"defect_types.csv": defect_types_to_csv(rows), "defect_types.md": defect_types_to_markdown(rows)}


SUMMARY_TABLES: list[Callable[[list[EvalResult]], dict[str, str]]] = [_mean_std_tables, _defect_type_tables]


def summary_tables(results: list[EvalResult]) -> dict[str, str]:
    tables: dict[str, str] = {}
    for build in SUMMARY_TABLES:
        tables.update(build(results))
    return tables


@dataclass
class EvalEntry:
    """One evaluation job of a summary folder and the context of its nested run."""

    result: EvalResult
    params: dict = field(default_factory=dict)  # e.g. backbone identity; lodo: holdout, train datasets
    tags: dict = field(default_factory=dict)
    training: TrainResult | None = None  # lodo: the training whose checkpoint it evaluates


@dataclass
class TrainEntry:
    """One training job of a summary folder (lodo)."""

    result: TrainResult
    label: str = ""  # run-name suffix, e.g. "(holdout a,b)"
    params: dict = field(default_factory=dict)


@dataclass
class SummaryRecord:
    """What the parent run of an evaluate/lodo command logs, live or from storage."""

    kind: str  # "evaluate" | "lodo"
    url: str  # the summary folder
    name: str  # the parent run's name
    config: dict
    params: dict  # parent params besides the config and results_url
    evaluations: list[EvalEntry] = field(default_factory=list)
    trainings: list[TrainEntry] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)  # file name -> text

    @property
    def rows(self) -> list[dict]:
        return summary_rows([entry.result for entry in self.evaluations])

    def job_urls(self) -> list[str]:
        return [e.result.job_url for e in self.evaluations] + [t.result.checkpoint for t in self.trainings]


def new_folder_url(output: str, kind: str) -> str:
    """`OUTPUT/<kind dir>/<local time>-<6 hex>`: names sort by time, and two commands finishing in the
    same second (or racing on one output) never write into one folder."""
    return storage.join(output, KIND_DIRS[kind], f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


def evaluate_record(config: RunConfig, results: list[EvalResult], backbone_identity: dict) -> SummaryRecord:
    """The summary of an `evaluate` command: every (k, seed) job is a nested run of one parent."""
    datasets = sorted({d for r in results for d in r.spec.datasets})
    context = {"backbone_identity": backbone_identity}
    return SummaryRecord(
        kind="evaluate", url=new_folder_url(config.output, "evaluate"),
        name=f"evaluate {'+'.join(datasets)} {config.method.name}", config=config.to_dict(),
        params=dict(context), evaluations=[EvalEntry(r, dict(context)) for r in results],
        tables=summary_tables(results))


def write_summary_folder(record: SummaryRecord, config: RunConfig) -> None:
    """config.yaml and the tables first, `jobs.json` last (its presence marks a complete folder)."""
    save_config(config, storage.join(record.url, "config.yaml"))
    for name, text in record.tables.items():
        storage.atomic_write_bytes(storage.join(record.url, name), text.encode())
    storage.atomic_write_json(storage.join(record.url, JOBS_FILE), {
        "format": FOLDER_FORMAT, "kind": record.kind, "name": record.name, "params": record.params,
        "tables": list(record.tables),
        "evaluations": [{"url": e.result.job_url, "params": e.params, "tags": e.tags,
                         "training": e.training.checkpoint if e.training else None}
                        for e in record.evaluations],
        "trainings": [{"url": t.result.checkpoint, "label": t.label, "params": t.params}
                      for t in record.trainings],
    })


def is_summary_folder(url: str) -> bool:
    """A folder written by `write_summary_folder`, or a lodo folder from before `jobs.json`."""
    return storage.exists(storage.join(url, JOBS_FILE)) or storage.exists(storage.join(url, "summary.csv"))


def listed_urls(url: str) -> set[str]:
    """The evaluation jobs and checkpoints a summary folder lists (none for an older lodo folder)."""
    path = storage.join(url, JOBS_FILE)
    if not storage.exists(path):
        return set()
    saved = storage.read_json(path)
    return {entry["url"].rstrip("/") for key in ("evaluations", "trainings") for entry in saved.get(key, [])}


def _config(url: str) -> dict:
    path = storage.join(url, "config.yaml")
    return (load_config(path) if storage.exists(path) else RunConfig()).to_dict()


def load_summary_folder(url: str) -> SummaryRecord:
    """The record of a stored summary folder: its jobs loaded from their committed outputs."""
    path = storage.join(url, JOBS_FILE)
    if not storage.exists(path):  # a lodo folder from before jobs.json: the parent and its tables only
        tables = {name: storage.read_bytes(storage.join(url, name)).decode()
                  for name in ("summary.csv", "summary.md") if storage.exists(storage.join(url, name))}
        return SummaryRecord("lodo", url, f"lodo {url.rstrip('/').rsplit('/', 1)[-1]}", _config(url), {},
                             tables=tables)
    saved = storage.read_json(path)
    trainings = {t["url"]: TrainEntry(stored_train_result(t["url"]), t.get("label", ""), t.get("params", {}))
                 for t in saved.get("trainings", [])}

    def training(checkpoint: str | None) -> TrainResult | None:
        if not checkpoint:
            return None
        return trainings[checkpoint].result if checkpoint in trainings else stored_train_result(checkpoint)

    evaluations = [EvalEntry(stored_eval_result(e["url"]), e.get("params", {}), e.get("tags", {}),
                             training(e.get("training"))) for e in saved.get("evaluations", [])]
    tables = {name: storage.read_bytes(storage.join(url, name)).decode() for name in saved.get("tables", [])}
    return SummaryRecord(saved["kind"], url, saved["name"], _config(url), saved.get("params", {}),
                         evaluations, list(trainings.values()), tables)

