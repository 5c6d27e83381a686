"""`train`: fit a method's learnable parts on auxiliary datasets, one Ray task per training job.

Every auxiliary category gives its labelled `test` images (normal and anomalous, with masks where the
dataset has them) and k fixed normal `train` references; methods that ask for it (`uses_normal_pool`:
ResAD++) also get all normal `train` images of the category, as their authors train on them (ResAD++:
stage 1 on `train/good`, stage 2 on train + test, references drawn per batch from `train/good`).
Images without a mask carry `has_mask=False`, so methods use them only in the losses that need no
mask. The job records what each dataset contributed and, per category, what the method draws from
which split. The checkpoint is committed under a content-addressed key and reused.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from workflows import storage
from workflows.config import MethodConfig, RunConfig
from workflows.pipelines.index import categories_of, normal_train_ids, read_images
from workflows.pipelines.models import backbone_info, content_key, method_preprocess, probe_backbone
from workflows.pipelines.ray_runtime import resolve_device

LOG_NAME = "train_log.json"
# 2: normal `train` pools for methods that use them (ResAD++ as its authors), provenance in the log
TRAIN_DATA_FORMAT = 2


@dataclass(frozen=True)
class TrainSpec:
    datasets: tuple[str, ...]  # auxiliary datasets
    method: MethodConfig
    seed: int

    def __hash__(self) -> int:  # MethodConfig holds a dict: hash the JSON form
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))


@dataclass
class TrainResult:
    spec: TrainSpec
    checkpoint: str
    losses: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    contributions: dict[str, dict] = field(default_factory=dict)
    reference_ids: dict[str, list[str]] = field(default_factory=dict)
    reused: bool = False


def checkpoint_url(config: RunConfig, spec: TrainSpec, identity_key: str) -> str:
    from residual_core.methods.registry import training_params

    method = {k: v for k, v in asdict(spec.method).items() if k != "checkpoint"}
    # one training serves every scoring-only variant (e.g. ResAD++'s score_branch ablations)
    method["params"] = training_params(spec.method.name, method.get("params") or {})
    key = content_key({
        "data": config.data.url, "datasets": sorted(spec.datasets), "categories": config.data.categories,
        "backbone": identity_key, "method": method, "preprocess": method_preprocess(spec.method),
        "seed": spec.seed, "ref_shot": config.train.ref_shot,
        "cap": config.train.max_images_per_category, "train_data": TRAIN_DATA_FORMAT,
    })
    return storage.join(config.output, "checkpoints", spec.method.name, key)


def load_train_data(config: RunConfig, datasets: tuple[str, ...], seed: int, info, preprocess: str, *,
                    normal_pool: bool = False) -> tuple[list, dict, dict]:
    """CategoryTrainData for every category of the auxiliary datasets; contributions; reference ids.

    Every category gets its labelled `test` images (`images`) and `train.ref_shot` fixed normal `train`
    references; with `normal_pool` (methods with `uses_normal_pool`) also all its normal `train` images
    as a uint8 `ImagePool`. Images and masks go through the `preprocess` preset.
    `train.max_images_per_category` caps the test images and the pool, each to a deterministic subset of
    that size; the fixed references are not capped.
    """
    import torch

    from residual_core.bank import select_reference_ids
    from residual_core.images import decode_image, decode_mask
    from residual_core.methods import CategoryTrainData
    from residual_core.preprocess import get_preprocess
    from workflows.datasets.reader import read_table

    preset = get_preprocess(preprocess)
    data, contributions, references = [], {}, {}
    cap = config.train.max_images_per_category
    size = info.image_size
    for dataset, category in categories_of(config.data.url, list(datasets), config.data.categories):
        train_ids = normal_train_ids(config.data.url, dataset, category)
        ref_ids = select_reference_ids(train_ids, config.train.ref_shot, seed)
        refs = read_images(config.data.url, dataset, category, "train", ref_ids, info, preprocess)
        table = read_table(config.data.url, columns=["image_id", "label", "image", "mask"],
                           filters=[("dataset", "==", dataset), ("category", "==", category),
                                    ("split", "==", "test")])
        rows = [r for r in table.to_pylist() if r["label"] is not None]
        if cap is not None and len(rows) > cap:
            keep = set(select_reference_ids([r["image_id"] for r in rows], cap, seed))
            rows = [r for r in rows if r["image_id"] in keep]
        rows.sort(key=lambda r: r["image_id"])
        images, masks, labels, has_mask, skipped = [], [], [], [], 0
        for row in rows:
            try:
                image = decode_image(row["image"])
                mask = decode_mask(row["mask"], image.size) if row["mask"] is not None else None
            except Exception:  # noqa: BLE001 - corrupt training rows are counted and left out
                skipped += 1
                continue
            images.append(preset.image(image, size, info.mean, info.std))
            masks.append(preset.mask(mask, size))
            labels.append(int(row["label"]))
            has_mask.append(mask is not None or row["label"] == 0)
        pool, pool_skipped = None, 0
        if normal_pool:
            pool_ids = train_ids if cap is None or len(train_ids) <= cap else sorted(
                select_reference_ids(train_ids, cap, seed))
            pool, pool_skipped = _read_normal_pool(config.data.url, dataset, category, pool_ids, info, preset)
        if not images and not (pool is not None and len(pool)):
            continue
        with_masks = sum(1 for flag, label in zip(has_mask, labels, strict=True) if flag and label == 1)
        any_mask = with_masks > 0
        data.append(CategoryTrainData(
            dataset=dataset, category=category, references=refs,
            images=torch.stack(images) if images else torch.zeros(0, 3, *refs.shape[-2:]),
            labels=torch.tensor(labels, dtype=torch.long),
            masks=torch.stack(masks) if any_mask else None,
            has_mask=torch.tensor(has_mask) if any_mask else torch.zeros(len(labels), dtype=torch.bool),
            normal_pool=pool, image_split="test", reference_split="train",
        ))
        entry = contributions.setdefault(dataset, {"categories": [], "images": 0, "anomalous": 0,
                                                   "anomalous_with_mask": 0, "train_normal_images": 0,
                                                   "skipped": 0})
        entry["categories"].append(category)
        entry["images"] += len(labels)
        entry["anomalous"] += sum(labels)
        entry["anomalous_with_mask"] += with_masks
        entry["train_normal_images"] += len(pool) if pool is not None else 0
        entry["skipped"] += skipped + pool_skipped
        references[f"{dataset}/{category}"] = list(ref_ids)
    for entry in contributions.values():
        entry["mask_losses"] = entry["anomalous_with_mask"] > 0
        entry["used_for"] = ("all losses" if entry["mask_losses"]
                             else "losses without masks only (image labels)")
    return data, contributions, references


def _read_normal_pool(data_url: str, dataset: str, category: str, image_ids: list[str], info, preset,
                      chunk: int = 64):
    """The given normal `train` images as an ImagePool (uint8, in the order of `image_ids`), streamed in
    chunks so only one chunk of encoded bytes is held; corrupt images are counted and left out."""
    import torch

    from residual_core.images import decode_image
    from residual_core.methods import ImagePool
    from workflows.datasets.reader import iter_batches

    pixels: dict[str, torch.Tensor] = {}
    skipped = 0
    for start in range(0, len(image_ids), chunk):
        filters = [("dataset", "==", dataset), ("category", "==", category), ("split", "==", "train"),
                   ("image_id", "in", list(image_ids[start:start + chunk]))]
        for batch in iter_batches(data_url, columns=["image_id", "image"], filters=filters, batch_size=chunk):
            ids, encoded = batch.column("image_id").to_pylist(), batch.column("image").to_pylist()
            for image_id, data in zip(ids, encoded, strict=True):
                try:
                    tensor = preset.image(decode_image(data), info.image_size, info.mean, info.std)
                except Exception:  # noqa: BLE001 - corrupt training rows are counted and left out
                    skipped += 1
                    continue
                pixels[image_id] = ImagePool.quantize(tensor[None], info.mean, info.std)[0]
    kept = [i for i in image_ids if i in pixels]
    size = info.image_size
    stacked = (torch.stack([pixels.pop(i) for i in kept]) if kept
               else torch.zeros(0, 3, size, size, dtype=torch.uint8))
    return ImagePool(stacked, tuple(info.mean), tuple(info.std), split="train"), skipped


def train_task(config_dict: dict, spec: TrainSpec, url: str, progress_queue=None, job: int = 0) -> dict:
    """Ray task body: load data, fit (each step's losses streamed to `progress_queue` as job `job`), save
    and commit the checkpoint with its log."""
    from workflows.config import config_from_dict
    from workflows.pipelines.artifacts import upload_dir
    from workflows.pipelines.models import create_backbone_from_config

    config = config_from_dict(config_dict)
    device = resolve_device(config.device)
    backbone = create_backbone_from_config(asdict(config.backbone), device).eval()
    info = backbone_info(backbone)
    from residual_core.methods.registry import create_method, seeded_params

    # seeds 0, 1, 2 are three trainings (initialisation and shuffling), not one training three times
    params = seeded_params(spec.method.name, spec.method.params, spec.seed)
    method = create_method(spec.method.name, backbone, **params).to(device)
    data, contributions, references = load_train_data(config, spec.datasets, spec.seed, info,
                                                      method_preprocess(spec.method),
                                                      normal_pool=method.uses_normal_pool)
    if not data:
        raise ValueError(f"training on {spec.datasets}: no labelled test images or normal train images")
    # what fit draws from which split, per dataset and category (logged with the contributions)
    drawn = method.training_data_record(data)
    for cat in data:
        contributions[cat.dataset].setdefault("training_data", {})[cat.category] = drawn[cat.name]
    import torch

    from workflows.pipelines.train_progress import ProgressSender

    torch.manual_seed(spec.seed)
    sender = ProgressSender(progress_queue, job, method.planned_steps(data))
    losses: list[tuple[int, dict[str, float]]] = []

    def log(step: int, values: dict) -> None:
        losses.append(sender(step, values))

    method.fit(data, log)
    sender.flush()
    record = {"losses": losses, "contributions": contributions, "reference_ids": references,
              "backbone_identity": info.identity}
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        method.save_checkpoint(tmp)
        storage.atomic_write_json(storage.join(url, LOG_NAME), record)
        upload_dir(tmp, url, {"method": spec.method.name, "datasets": list(spec.datasets), "seed": spec.seed,
                              "method_params": spec.method.params})
    return record


def run_trainings(config: RunConfig, specs: list[TrainSpec], *, progress: bool = True,
                  on_steps: Callable[[TrainSpec, list[tuple[int, dict]]], None] | None = None
                  ) -> list[TrainResult]:
    """Run (or reuse) every training job; jobs run in parallel as Ray tasks, each with a live progress
    bar (steps, ETA, running losses); `on_steps(spec, steps)` gets each job's steps as they arrive."""
    import ray
    from ray.util.queue import Queue

    from workflows.pipelines.ray_runtime import gpus_per_worker
    from workflows.pipelines.train_progress import ProgressBoard, wait_with_progress

    info = probe_backbone(asdict(config.backbone))
    urls = [checkpoint_url(config, spec, info.identity_key) for spec in specs]
    todo = [(spec, url) for spec, url in zip(specs, urls, strict=True) if not storage.is_committed(url)]
    if todo:
        gpus = gpus_per_worker(config.train.num_gpus)
        remote = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=1)(train_task)
        queue = Queue(actor_options={"num_cpus": 0})
        labels = [f"train {spec.method.name} seed={spec.seed} on {'+'.join(spec.datasets)}"
                  for spec, _ in todo]
        forward = None if on_steps is None else (lambda job, steps: on_steps(todo[job][0], steps))
        board = ProgressBoard(labels, progress=progress, on_steps=forward)
        try:
            refs = [remote.remote(config.to_dict(), spec, url, queue, job)
                    for job, (spec, url) in enumerate(todo)]
            wait_with_progress(refs, queue, board)
        finally:
            queue.shutdown()
    fresh = {url for _, url in todo}
    results = []
    for spec, url in zip(specs, urls, strict=True):
        log = storage.read_json(storage.join(url, LOG_NAME))
        results.append(TrainResult(spec, url, [(s, v) for s, v in log["losses"]], log["contributions"],
                                   log["reference_ids"], reused=url not in fresh))
    return results


def stored_train_result(url: str) -> TrainResult:
    """A committed checkpoint's training, from its marker and log (what `log-results` logs)."""
    log = storage.read_json(storage.join(url, LOG_NAME))
    marker = storage.read_json(storage.join(url, storage.SUCCESS_MARKER))
    method = MethodConfig(marker.get("method", "?"), marker.get("method_params", {}))
    spec = TrainSpec(tuple(marker.get("datasets", [])), method, marker.get("seed"))
    return TrainResult(spec, url, [(int(step), values) for step, values in log.get("losses", [])],
                       log.get("contributions", {}), log.get("reference_ids", {}), reused=True)


def stored_train_identity(url: str) -> dict | None:
    """The backbone identity a checkpoint was trained on (None for checkpoints older than the field)."""
    return storage.read_json(storage.join(url, LOG_NAME)).get("backbone_identity")


def train_spec(config: RunConfig) -> TrainSpec:
    """The `train` command's job: config.method on config.train.datasets (default: every dataset)."""
    datasets = config.train.datasets or config.data.datasets or sorted(
        {d for d, _ in categories_of(config.data.url, None, None)})
    return TrainSpec(tuple(datasets), config.method, config.train.seed)


def run_train(config: RunConfig, *, progress: bool = True, on_steps=None) -> list[TrainResult]:
    """The `train` command's training (`train_spec`); `on_steps` as in `run_trainings`."""
    return run_trainings(config, [train_spec(config)], progress=progress, on_steps=on_steps)
