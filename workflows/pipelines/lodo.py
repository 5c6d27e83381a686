"""`lodo`: leave-one-dataset-out. For each held-out dataset D: train on every dataset outside D's
source group (trainable methods), evaluate on D for each method x k x seed; then the summary.

All trainings run first (parallel Ray tasks); then all evaluations share one scoring pipeline.
Reruns reuse committed checkpoints and evaluations and resume interrupted ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from workflows import storage
from workflows.config import MethodConfig, RunConfig, save_config
from workflows.pipelines.evaluate import METRIC_NAMES, EvalResult, EvalSpec, run_evaluations
from workflows.pipelines.index import categories_of
from workflows.pipelines.models import probe_backbone
from workflows.pipelines.summary import summary_rows, to_csv, to_markdown
from workflows.pipelines.train import TrainResult, TrainSpec, run_trainings


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


def run_lodo(config: RunConfig, *, progress: bool = True) -> LodoOutcome:
    from workflows.pipelines.models import create_backbone_from_config
    from workflows.reports.evaluation import log_evaluation_reports
    from workflows.tracking import Tracker, eval_metrics, log_results_table

    datasets = config.data.datasets or sorted({d for d, _ in categories_of(config.data.url, None, None)})
    groups = source_groups(config, datasets)
    folds = plan_folds(datasets, groups, config.lodo.holdout or None)
    info = probe_backbone(asdict(config.backbone))
    probe = create_backbone_from_config(asdict(config.backbone), "cpu")
    trainable = {m.name: _is_trainable(m, probe) for m in config.lodo.methods}
    del probe

    train_specs: dict[tuple[str, str, int], TrainSpec] = {}
    for fold in folds:
        for method in config.lodo.methods:
            if not trainable[method.name] or method.checkpoint:
                continue
            if not fold.train_datasets:
                raise ValueError(
                    f"fold {fold.holdout}: no dataset outside source group {fold.group!r} to train on")
            for seed in config.index.seeds:
                train_specs[(fold.holdout, method.name, seed)] = TrainSpec(fold.train_datasets, method, seed)
    trainings = run_trainings(config, list(dict.fromkeys(train_specs.values())), progress=progress)
    by_spec = {result.spec: result for result in trainings}

    eval_specs, eval_train = [], {}
    for fold in folds:
        for method in config.lodo.methods:
            for seed in config.index.seeds:
                trained = train_specs.get((fold.holdout, method.name, seed))
                used = replace(method, checkpoint=by_spec[trained].checkpoint) if trained else method
                for k in config.index.shots:
                    spec = EvalSpec((fold.holdout,), used, k, seed)
                    eval_specs.append(spec)
                    eval_train[spec] = by_spec[trained] if trained else None
    evaluations = run_evaluations(config, eval_specs, progress=progress)
    rows = summary_rows(evaluations)
    markdown = to_markdown(rows)
    outcome = LodoOutcome(folds, trainings, evaluations, rows, markdown)

    run_url = storage.join(config.output, "lodo", time.strftime("%Y%m%d-%H%M%S"))
    save_config(config, storage.join(run_url, "config.yaml"))
    storage.atomic_write_bytes(storage.join(run_url, "summary.csv"), to_csv(rows).encode())
    storage.atomic_write_bytes(storage.join(run_url, "summary.md"), markdown.encode())

    versions = dataset_version(config.data.url, datasets)
    tracker = Tracker(config.tracking.experiment, config.tracking.enabled, results_url=config.output)
    with tracker.run(f"lodo {'+'.join(datasets)}", tags={"kind": "lodo"}) as parent:
        tracker.params({"config": config.to_dict(), "backbone_identity": info.identity,
                        "source_groups": groups, "folds": [asdict(f) for f in folds],
                        "dataset_version": versions})
        for result in trainings:
            holdouts = [h for (h, m, s), spec in train_specs.items() if spec == result.spec]
            with tracker.run(f"train {result.spec.method.name} seed={result.spec.seed} "
                             f"(holdout {','.join(holdouts)})", nested=True, tags={"kind": "train"}):
                tracker.params({"method": asdict(result.spec.method),
                                "train_datasets": list(result.spec.datasets),
                                "seed": result.spec.seed, "checkpoint": result.checkpoint,
                                "backbone_identity": info.identity, "reused": result.reused})
                tracker.loss_history(result.losses)
                tracker.json(result.contributions, "contributions.json")
                tracker.json(result.reference_ids, "reference_ids.json")
        for result in evaluations:
            spec = result.spec
            trained = eval_train.get(spec)
            with tracker.run(f"eval {spec.datasets[0]} {spec.method.name} k={spec.k_shot} seed={spec.seed}",
                             nested=True, tags={"kind": "evaluate", "holdout": spec.datasets[0],
                                                "method": spec.method.name}):
                tracker.params({
                    "holdout": spec.datasets[0], "method": spec.method.name,
                    "method_params": spec.method.params,
                    "k_shot": spec.k_shot, "seed": spec.seed, "checkpoint": spec.method.checkpoint or "",
                    "dataset_version": versions.get(spec.datasets[0], ""),
                    "train_datasets": list(trained.spec.datasets) if trained else [],
                    "backbone_identity": info.identity, "results_url": result.job_url,
                    "reference_ids": result.reference_ids,
                })
                tracker.metrics(eval_metrics(result.per_category, result.per_dataset, METRIC_NAMES))
                tracker.metrics({"images": result.counts.get("images", 0),
                                 "skipped_images": result.counts.get("skipped", 0)})
                tracker.json({"per_category": result.per_category, "per_dataset": result.per_dataset,
                              "counts": result.counts}, "metrics.json")
                if trained:
                    tracker.json(trained.contributions, "train_contributions.json")
                log_results_table(tracker, result.job_url)
                log_evaluation_reports(tracker, result.job_url)  # curves/ and gallery/ PNGs
        parent_metrics = {}
        for row in rows:
            for metric in METRIC_NAMES:
                for stat in ("mean", "std"):
                    value = row[f"{metric}_{stat}"]
                    if value is not None:
                        key = f"{row['dataset']}/{row['method']}/k{row['k']}/{metric}_{stat}"
                        parent_metrics[key.replace("@", "_")] = value
        tracker.metrics(parent_metrics)
        tracker.text(to_csv(rows), "summary.csv")
        tracker.text(markdown, "summary.md")
        outcome.run_id = parent.info.run_id if parent is not None else None
    return outcome
