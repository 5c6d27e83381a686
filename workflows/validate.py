"""Check a run's config and inputs on the driver, before Ray starts: a bad config fails in a second with
one line that says what, where, why and what to do, instead of minutes later inside a Ray worker.

`validate_run(config, command)` is called by every pipeline command (index, train, evaluate, lodo)
right after `load_config` (which already rejected unknown keys, wrong types, bad enums and ranges).
It reads only the dataset manifest (partition label counts), never an image, and builds no backbone.
Every problem raises `ConfigError`, which the CLI prints as one line and maps to exit code 2.
"""

from __future__ import annotations

from workflows import storage
from workflows.config import ConfigError, MethodConfig, RunConfig

PIPELINE_COMMANDS = ("index", "train", "evaluate", "lodo")


def validate_run(config: RunConfig, command: str) -> None:
    """Raise ConfigError for the first problem of `config` for `command`; return None when it can run."""
    if command not in PIPELINE_COMMANDS:
        raise ValueError(f"validate_run: unknown command {command!r}")
    if command == "lodo":
        for i, method in enumerate(config.lodo.methods):
            check_method(method, f"lodo.methods[{i}]")
    else:
        check_method(config.method, "method")
    manifest = _manifest(config.data.url)
    partitions = {(p["dataset"], p["category"], p["split"]): p for p in manifest["partitions"]}
    datasets = _check_datasets(config.data.datasets, partitions, "data.datasets", config.data.url)
    _check_categories(config.data.categories, datasets, partitions, config.data.url)
    if command == "lodo":
        _check_datasets(config.lodo.holdout, partitions, "lodo.holdout", config.data.url,
                        within=datasets)
    if command == "train":
        train_sets = _check_datasets(config.train.datasets, partitions, "train.datasets", config.data.url)
        _check_normals(train_sets, config.data.categories, partitions, config.train.ref_shot,
                       "train.ref_shot", config.data.url)
        return
    scored = config.lodo.holdout if command == "lodo" and config.lodo.holdout else datasets
    _check_normals(scored, config.data.categories, partitions, max(config.index.shots), "index.shots",
                   config.data.url)


def check_method(method: MethodConfig, where: str) -> None:
    """The method's name and params, resolved into its typed config without a backbone (the method's own
    MethodError message says what is wrong); its checkpoint URL must exist when one is given."""
    from residual_core.methods import MethodError, available_methods, method_preprocess

    names = available_methods()
    if method.name not in names:
        raise ConfigError(f"unknown method {method.name!r} ({where}.name): no method of that name is "
                          f"registered; use one of {', '.join(names)}")
    try:
        method_preprocess(method.name, method.params)
    except MethodError as exc:
        raise ConfigError(f"bad method params ({where}.params): {exc}; fix or remove them") from None
    except (TypeError, ValueError) as exc:  # a config class that rejects a value its own way
        raise ConfigError(f"bad method params ({where}.params): {method.name}: {exc}; fix or remove "
                          "them") from None
    if method.checkpoint and not storage.exists(method.checkpoint):
        raise ConfigError(f"missing checkpoint ({where}.checkpoint): nothing at "
                          f"{storage.redact(method.checkpoint)}; give the URL of a trained checkpoint "
                          "(residual-ad train prints it) or leave it empty")


def _manifest(url: str) -> dict:
    from workflows.datasets.reader import DatasetNotFoundError, require_manifest

    try:
        return require_manifest(url)
    except DatasetNotFoundError as exc:
        raise ConfigError(f"no dataset (data.url): {exc}; run `residual-ad ingest` (or build-bench) into "
                          "it first, or set data.url to an ingested dataset") from None


def _check_datasets(asked: list[str], partitions: dict, key: str, url: str,
                    within: list[str] | None = None) -> list[str]:
    """The asked datasets (all of `within`, or of the manifest, when none are asked); unknown ones fail."""
    present = sorted({d for d, _, _ in partitions}) if within is None else sorted(within)
    if not present:
        raise ConfigError(f"empty dataset (data.url): {storage.redact(url)} has no partitions; ingest "
                          "some data into it")
    missing = [d for d in asked if d not in present]
    if missing:
        raise ConfigError(f"unknown dataset(s) {', '.join(missing)} ({key}): not in "
                          f"{storage.redact(url)}; use some of {', '.join(present)}")
    return list(asked) or present


def _check_categories(asked: list[str], datasets: list[str], partitions: dict, url: str) -> None:
    present = sorted({c for d, c, _ in partitions if d in datasets})
    missing = [c for c in asked if c not in present]
    if missing:
        raise ConfigError(f"unknown categor{'y' if len(missing) == 1 else 'ies'} {', '.join(missing)} "
                          f"(data.categories): not in dataset(s) {', '.join(datasets)} of "
                          f"{storage.redact(url)}; use some of {', '.join(present)}")
    if not any(s == "test" and d in datasets and (not asked or c in asked) for d, c, s in partitions):
        raise ConfigError(f"nothing to score (data.categories): no test images of "
                          f"{', '.join(asked) or 'any category'} in dataset(s) {', '.join(datasets)}; "
                          "ingest a test split or choose other datasets/categories")


def normal_train_count(partition: dict | None) -> int:
    """Normal (label 0 or unlabelled) images of a `train` partition, from its manifest label counts."""
    if not partition:
        return 0
    labels = partition.get("labels") or {}
    return int(labels.get("0", 0)) + int(labels.get("null", 0))


def _check_normals(datasets: list[str], categories: list[str], partitions: dict, k: int, key: str,
                   url: str) -> None:
    """Every category with test images to score needs at least k normal `train` references."""
    short = []
    for dataset, category, split in sorted(partitions):
        if split != "test" or dataset not in datasets or (categories and category not in categories):
            continue
        found = normal_train_count(partitions.get((dataset, category, "train")))
        if found < k:
            short.append(f"{dataset}/{category} has {found}")
    if short:
        raise ConfigError(f"too few normal train images ({key}={k}): {len(short)} categor"
                          f"{'y' if len(short) == 1 else 'ies'} need {k}: {'; '.join(short[:5])}"
                          f"{'; ...' if len(short) > 5 else ''}; lower {key}, add normal train images "
                          "(ingest) or leave those categories out (data.categories)")
