"""`lodo`: leave-one-dataset-out. For each held-out dataset D: train on every dataset outside D's
source group (trainable methods), evaluate on D for each method x k x seed; then the summary.

`run_lodo` is three steps: `plan_lodo` (folds, training and evaluation specs), `run_plan` (all
trainings first as parallel Ray tasks, then all evaluations in one scoring pipeline) and `summarise`
(the summary folder `<output>/lodo/<timestamp>/` and the parent MLflow run, `workflows.tracking`).
Reruns reuse committed checkpoints and evaluations and resume interrupted ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from workflows.config import MethodConfig, RunConfig
from workflows.pipelines.evaluate import EvalResult, EvalSpec, run_evaluations
from workflows.pipelines.index import categories_of
from workflows.pipelines.models import probe_backbone
from workflows.pipelines.summary import summary_rows
from workflows.pipelines.summary_folder import (
    EvalEntry,
    SummaryRecord,
    TrainEntry,
    new_folder_url,
    summary_tables,
    write_summary_folder,
)
from workflows.pipelines.train import TrainResult, TrainSpec, run_trainings

# per evaluation spec: the training whose checkpoint it evaluates (None: not trained here)
TrainedBy = dict[EvalSpec, TrainResult | None]


@dataclass
class Fold:
    holdout: str
    group: str
    train_datasets: tuple[str, ...]


@dataclass
class LodoOutcome:
    folds: list[Fold]
    trainings: list[TrainResult]
    evaluations: list[EvalResult]
    rows: list[dict]
    markdown: str
    run_id: str | None = None
    summary_url: str = ""


@dataclass
class LodoPlan:
    """What a lodo run does: its folds, the trainings (keyed by fold, method, seed) and the evaluations
    (each with the key of the training whose checkpoint it uses, or None)."""

    datasets: list[str]
    groups: dict[str, str]
    folds: list[Fold]
    backbone_identity: dict
    train_specs: dict[tuple[str, str, int], TrainSpec] = field(default_factory=dict)
    # (fold, method, seed, k) per evaluation
    evaluations: list[tuple[Fold, MethodConfig, int, int]] = field(default_factory=list)


def _find_groups(node, out: dict[str, str], parent_key: str | None = None) -> None:
    """Collect dataset -> source group from any manifest section that records one."""
    if isinstance(node, dict):
        group = node.get("source_group")
        name = node.get("dataset") or node.get("name") or parent_key
        if isinstance(group, str) and isinstance(name, str):
            out.setdefault(name, group)
        for key, value in node.items():
            if key == "source_groups" and isinstance(value, dict):
                for dataset, grp in value.items():
                    if isinstance(grp, str):
                        out.setdefault(dataset, grp)
            else:
                _find_groups(value, out, key)
    elif isinstance(node, list):
        for item in node:
            _find_groups(item, out, parent_key)


def source_groups(config: RunConfig, datasets: list[str]) -> dict[str, str]:
    """Config `data.source_groups` first, then the dataset manifest, else each dataset alone."""
    from workflows.datasets.reader import read_manifest

    found: dict[str, str] = {}
    _find_groups(read_manifest(config.data.url).get("extra", {}), found)
    found.update(config.data.source_groups)
    return {d: found.get(d, d) for d in datasets}


def dataset_version(data_url: str, datasets: list[str]) -> dict[str, str]:
    """Per dataset: the write ids of its committed partitions (changes whenever the data is rewritten)."""
    from workflows.datasets.reader import read_manifest

    versions: dict[str, set] = {}
    for part in read_manifest(data_url)["partitions"]:
        if part["dataset"] in datasets:
            versions.setdefault(part["dataset"], set()).add(str(part.get("write_id", "")))
    return {name: ",".join(sorted(ids)) for name, ids in sorted(versions.items())}


def plan_folds(datasets: list[str], groups: dict[str, str], holdout: list[str] | None = None) -> list[Fold]:
    """One fold per held-out dataset; its whole source group stays out of training."""
    folds = []
    for dataset in holdout or datasets:
        if dataset not in groups:
            raise ValueError(f"held-out dataset {dataset!r} is not among {datasets}")
        group = groups[dataset]
        train = tuple(d for d in datasets if groups[d] != group)
        folds.append(Fold(dataset, group, train))
    return folds


def _is_trainable(method: MethodConfig, backbone) -> bool:
    from residual_core.methods import create_method

    return bool(create_method(method.name, backbone, **method.params).trainable)


def plan_lodo(config: RunConfig) -> LodoPlan:
    """Folds by source group, one training per (fold, trainable method, seed), one evaluation per
    (fold, method, seed, k)."""
    from workflows.pipelines.models import create_backbone_from_config

    datasets = config.data.datasets or sorted({d for d, _ in categories_of(config.data.url, None, None)})
    groups = source_groups(config, datasets)
    folds = plan_folds(datasets, groups, config.lodo.holdout or None)
    info = probe_backbone(asdict(config.backbone))
    probe = create_backbone_from_config(asdict(config.backbone), "cpu")
    trainable = {m.name: _is_trainable(m, probe) for m in config.lodo.methods}
    del probe
    plan = LodoPlan(datasets, groups, folds, info.identity)
    for fold in folds:
        for method in config.lodo.methods:
            if not trainable[method.name] or method.checkpoint:
                continue
            if not fold.train_datasets:
                raise ValueError(
                    f"fold {fold.holdout}: no dataset outside source group {fold.group!r} to train on")
            for seed in config.index.seeds:
                spec = TrainSpec(fold.train_datasets, method, seed)
                plan.train_specs[(fold.holdout, method.name, seed)] = spec
    plan.evaluations = [(fold, method, seed, k) for fold in folds for method in config.lodo.methods
                        for seed in config.index.seeds for k in config.index.shots]
    return plan


def run_plan(config: RunConfig, plan: LodoPlan, *, progress: bool = True
             ) -> tuple[list[TrainResult], list[EvalResult], TrainedBy]:
    """All trainings (parallel Ray tasks), then every evaluation in one scoring pipeline; returns the
    trainings, the evaluations and, per evaluation, the training it evaluates."""
    trainings = run_trainings(config, list(dict.fromkeys(plan.train_specs.values())), progress=progress)
    by_spec = {result.spec: result for result in trainings}
    eval_specs, eval_train = [], {}
    for fold, method, seed, k in plan.evaluations:
        trained = plan.train_specs.get((fold.holdout, method.name, seed))
        used = replace(method, checkpoint=by_spec[trained].checkpoint) if trained else method
        spec = EvalSpec((fold.holdout,), used, k, seed)
        eval_specs.append(spec)
        eval_train[spec] = by_spec[trained] if trained else None
    evaluations = run_evaluations(config, eval_specs, progress=progress)
    return trainings, evaluations, eval_train


def lodo_record(config: RunConfig, plan: LodoPlan, trainings: list[TrainResult],
                evaluations: list[EvalResult], eval_train: TrainedBy) -> SummaryRecord:
    """The summary folder's record: parent params, nested trainings and evaluations with their context."""
    versions = dataset_version(config.data.url, plan.datasets)
    identity = {"backbone_identity": plan.backbone_identity}
    train_entries = []
    for result in trainings:
        holdouts = [h for (h, _, _), spec in plan.train_specs.items() if spec == result.spec]
        train_entries.append(TrainEntry(result, f"(holdout {','.join(holdouts)})", dict(identity)))
    eval_entries = []
    for result in evaluations:
        spec, trained = result.spec, eval_train.get(result.spec)
        holdout = spec.datasets[0]
        params = {"holdout": holdout, "method": spec.method.name, "method_params": spec.method.params,
                  "checkpoint": spec.method.checkpoint or "", "dataset_version": versions.get(holdout, ""),
                  "train_datasets": list(trained.spec.datasets) if trained else [], **identity}
        tags = {"holdout": holdout, "method": spec.method.name}
        eval_entries.append(EvalEntry(result, params, tags, trained))
    return SummaryRecord(
        kind="lodo", url=new_folder_url(config.output, "lodo"), name=f"lodo {'+'.join(plan.datasets)}",
        config=config.to_dict(),
        params={**identity, "source_groups": plan.groups, "folds": [asdict(f) for f in plan.folds],
                "dataset_version": versions},
        evaluations=eval_entries, trainings=train_entries, tables=summary_tables(evaluations))


def summarise(config: RunConfig, plan: LodoPlan, trainings: list[TrainResult], evaluations: list[EvalResult],
              eval_train: TrainedBy) -> LodoOutcome:
    """Write the summary folder, then log the parent run with its nested runs."""
    from workflows.tracking import Tracker, log_lodo_parent

    record = lodo_record(config, plan, trainings, evaluations, eval_train)
    write_summary_folder(record, config)
    tracker = Tracker(config.tracking.experiment, config.tracking.enabled, results_url=record.url)
    run_id = log_lodo_parent(tracker, record)
    rows = summary_rows(evaluations)
    return LodoOutcome(plan.folds, trainings, evaluations, rows, record.tables["summary.md"], run_id,
                       record.url)


def run_lodo(config: RunConfig, *, progress: bool = True) -> LodoOutcome:
    """Plan, run, summarise."""
    plan = plan_lodo(config)
    trainings, evaluations, eval_train = run_plan(config, plan, progress=progress)
    return summarise(config, plan, trainings, evaluations, eval_train)
