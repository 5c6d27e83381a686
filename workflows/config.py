"""Typed run configuration: one YAML file plus `--set key.sub=value` overrides.

Every pipeline command (index, train, evaluate, lodo) reads a `RunConfig`; the resolved config
(after overrides) is saved with the results and logged to MLflow, so a result always says how it
was produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user error in the run's config or inputs: an unknown key, a value of the wrong type or out of
    range, data or a checkpoint that is not there. The CLI prints it as one line and exits 2."""


def bad_value(key: str, value: Any, why: str, fix: str | None = None) -> ConfigError:
    """`bad value <value> (<key>): <why>; <what to do>` -- the one shape of a config value error."""
    return ConfigError(f"bad value {value!r} ({key}): {why}; {fix or f'set {key} to a valid value'}")


def _one_of(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise bad_value(key, value, f"must be one of {', '.join(choices)}",
                        f"set {key} to one of them (--set {key}={choices[0]})")


def _at_least(key: str, value: Any, minimum: float) -> None:
    if value is not None and value < minimum:
        raise bad_value(key, value, f"must be >= {minimum}", f"set {key} to {minimum} or more")


DEVICES = ("auto", "cpu", "cuda")
SAVE_MAPS = ("none", "sample", "all")
MAP_DTYPES = ("float16", "float32")


@dataclass
class DataConfig:
    url: str = ".demo/bench"  # the Parquet dataset (local path, file:// or s3://)
    datasets: list[str] = field(default_factory=list)  # empty: every dataset under url
    categories: list[str] = field(default_factory=list)  # empty: every category
    # dataset -> source group; datasets of one group are held out together in lodo.
    # Empty: read from the benchmark manifest when there is one, else each dataset is its own group.
    source_groups: dict[str, str] = field(default_factory=dict)


@dataclass
class BackboneConfig:
    spec: str = "effnet-lite0"
    layers: list[int] | None = None  # None: the backbone's default layers
    image_size: int | None = None  # None: the backbone's default resolution

    def __post_init__(self) -> None:
        _at_least("backbone.image_size", self.image_size, 1)


@dataclass
class MethodConfig:
    name: str = "baseline"
    params: dict[str, Any] = field(default_factory=dict)  # keyword hyper-parameters for create_method
    checkpoint: str | None = None  # URL of a trained checkpoint (evaluate of a trainable method)


@dataclass
class IndexConfig:
    shots: list[int] = field(default_factory=lambda: [1, 2, 4])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # A step whose missing banks hold at most this many reference images in all is built in the driver
    # process (when bank tasks would get no GPU) instead of as Ray tasks: the tasks' new worker processes
    # import torch and timm and build the model before a few images' forward (an index step of 5 banks of 4
    # images: 8.3 s against 3.4 s on a 2-core machine, RESULTS.md thirteenth pass). Same function, same
    # device, same banks. 0: always tasks.
    local_max_images: int = 128

    def __post_init__(self) -> None:
        for key, values in (("index.shots", self.shots), ("index.seeds", self.seeds)):
            if not values:
                raise bad_value(key, values, "must not be empty", f"give at least one, e.g. --set {key}=[1]")
        for k in self.shots:
            _at_least("index.shots", k, 1)
        _at_least("index.local_max_images", self.local_max_images, 0)


@dataclass
class TrainConfig:
    datasets: list[str] = field(default_factory=list)  # auxiliary datasets (train command)
    # fixed normal train references per auxiliary category (CategoryTrainData.references: Res2CLIP's
    # reference pool); ResAD++ draws its train_ref_shot per batch from all normal train images instead
    ref_shot: int = 4
    seed: int = 0
    # cap to bound memory/time: a deterministic subset of at most this many test images, and as many
    # normal train images in the pool of methods that use one (ResAD++); ref_shot is not capped
    max_images_per_category: int | None = None
    num_gpus: float | None = None  # None: 1 when the cluster has GPUs, else 0

    def __post_init__(self) -> None:
        _at_least("train.ref_shot", self.ref_shot, 1)
        _at_least("train.max_images_per_category", self.max_images_per_category, 1)
        _at_least("train.num_gpus", self.num_gpus, 0)


@dataclass
class EvaluateConfig:
    batch_size: int = 8
    # None: one per GPU share when the cluster has GPUs, else one per CPU for 7/8 of the CPUs (bounded by
    # memory: ray_runtime.default_cpu_actors); either way at most one per shard to score
    num_actors: int | None = None
    shard_size: int = 64  # images per idempotent shard
    num_gpus_per_actor: float | None = None  # None: 1 / actors_per_gpu when the cluster has GPUs, else 0
    actors_per_gpu: int = 2  # GPU actors per GPU unless num_gpus_per_actor says otherwise (operations.md)
    save_maps: str = "none"  # none | sample | all
    map_sample_fraction: float = 0.1  # with save_maps=sample: deterministic fraction of images
    map_dtype: str = "float16"  # saved maps: float16 (a quarter of float32's bytes) or float32 (exact)
    max_retries: int = 3  # actor restarts / task retries
    stop_after_shards: int | None = None  # test hook: stop after committing this many shards

    def __post_init__(self) -> None:
        for key in ("batch_size", "num_actors", "shard_size", "actors_per_gpu"):
            _at_least(f"evaluate.{key}", getattr(self, key), 1)
        _at_least("evaluate.num_gpus_per_actor", self.num_gpus_per_actor, 0)
        _at_least("evaluate.max_retries", self.max_retries, 0)
        _at_least("evaluate.stop_after_shards", self.stop_after_shards, 0)
        _one_of("evaluate.save_maps", self.save_maps, SAVE_MAPS)
        _one_of("evaluate.map_dtype", self.map_dtype, MAP_DTYPES)
        if not 0 < self.map_sample_fraction <= 1:
            raise bad_value("evaluate.map_sample_fraction", self.map_sample_fraction, "must be in (0, 1]",
                            "set evaluate.map_sample_fraction to e.g. 0.1")


@dataclass
class LodoConfig:
    methods: list[MethodConfig] = field(default_factory=lambda: [MethodConfig()])
    holdout: list[str] = field(default_factory=list)  # empty: every dataset in turn

    def __post_init__(self) -> None:
        if not self.methods:
            raise bad_value("lodo.methods", self.methods, "must not be empty",
                            "list at least one method (name, params)")


@dataclass
class TrackingConfig:
    experiment: str = "residual-ad"
    enabled: bool = True


@dataclass
class RunConfig:
    output: str = ".demo/runs"  # where indexes, checkpoints and results go (local or s3://)
    device: str = "auto"  # auto | cpu | cuda
    ray_address: str | None = None  # None: RAY_ADDRESS, else a local Ray
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    lodo: LodoConfig = field(default_factory=LodoConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise bad_value("device", self.device, f"must be one of {', '.join(DEVICES)} or cuda:<index>",
                            "set device to auto, cpu or cuda")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def key(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none): names a run's output."""
        data = self.to_dict()
        if sections:
            data = {name: data[name] for name in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- building from dicts
def _check_value(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_value(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(hint, value, where)
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # `--set index.shots=4` means [4]
        (item,) = typing.get_args(hint)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(hint)
        return {str(k): _check_value(v, item, f"{where}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def _from_dict(cls, data: dict, where: str = "config"):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {name: _check_value(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    return cls(**kwargs)


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key.sub=value` -> (key.sub, value parsed as YAML: numbers, lists `[1,2]`, null, true...)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return key, value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (local path or URL; None: defaults) and apply `key.sub=value` overrides."""
    tree: dict = {}
    if path:
        from workflows.storage import read_bytes

        loaded = yaml.safe_load(read_bytes(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = loaded
    base = dataclasses.asdict(RunConfig())
    for key, value in tree.items():  # merge the file over defaults section by section
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value
    for text in overrides or []:
        key, value = parse_override(text)
        _set_path(base, key, value)
    return _with_absolute_urls(_from_dict(RunConfig, base))


def _with_absolute_urls(config: RunConfig) -> RunConfig:
    """Local paths made absolute on the driver, so every Ray worker reads and writes the same place."""
    from workflows.storage import absolute

    config.output = absolute(config.output)
    config.data.url = absolute(config.data.url)
    for method in (config.method, *config.lodo.methods):
        if method.checkpoint:
            method.checkpoint = absolute(method.checkpoint)
    return config


def config_from_dict(data: dict) -> RunConfig:
    return _from_dict(RunConfig, data)


def save_config(config: RunConfig, url: str) -> None:
    """Write the resolved config as YAML beside results."""
    from workflows.storage import atomic_write_bytes

    atomic_write_bytes(url, yaml.safe_dump(config.to_dict(), sort_keys=True).encode())


def add_config_arguments(parser) -> None:
    """The config options shared by every pipeline subcommand."""
    parser.add_argument("--config", "-c", help="YAML run config (local path or URL)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set evaluate.batch_size=16 (repeatable)",
    )
    parser.add_argument("--ray-address", help="Ray cluster to connect to (default: RAY_ADDRESS, else local)")


def config_from_args(args) -> RunConfig:
    overrides = list(args.overrides or [])
    if getattr(args, "ray_address", None):
        overrides.append(f"ray_address={args.ray_address}")
    return load_config(args.config, overrides)
