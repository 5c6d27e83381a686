"""`index`: build reference banks (+ FAISS indexes) per (dataset, category, k, seed) as Ray tasks, or in
this process when the missing banks are few images on CPUs (`index.local_max_images`).

Banks live under a content-addressed key (backbone identity, layers, preprocessing preset, k, seed,
selected image ids), so an existing complete bank (with its commit marker) is reused, never rebuilt,
and a bank made with one method's preprocessing is never used for a method that preprocesses otherwise.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

from workflows import storage
from workflows.config import RunConfig
from workflows.pipelines.models import (
    BackboneInfo,
    content_key,
    create_backbone_from_config,
    method_preprocess,
    probe_backbone,
)

BANK_FORMAT = 1
BANK_TASK_CPUS = 1  # CPUs of a bank task, and torch threads of one built in this process


@dataclass(frozen=True)
class BankRequest:
    dataset: str
    category: str
    k_shot: int
    seed: int
    preprocess: str  # residual_core.preprocess preset of the method the bank serves


@dataclass(frozen=True)
class BankPlan:
    request: BankRequest
    image_ids: tuple[str, ...]
    url: str


def normal_train_ids(data_url: str, dataset: str, category: str) -> list[str]:
    """Image ids of the normal `train` images of one category (sorted)."""
    from workflows.datasets.reader import read_table

    table = read_table(
        data_url, columns=["image_id", "label"],
        filters=[("dataset", "==", dataset), ("category", "==", category), ("split", "==", "train")],
    )
    labels = table.column("label").to_pylist()
    return sorted(i for i, label in zip(table.column("image_id").to_pylist(), labels, strict=True)
                  if label in (0, None))


def plan_bank(config: RunConfig, info: BackboneInfo, request: BankRequest) -> BankPlan:
    """Choose the references deterministically and name the bank by its content."""
    from residual_core.bank import select_reference_ids

    candidates = normal_train_ids(config.data.url, request.dataset, request.category)
    if len(candidates) < request.k_shot:
        raise ValueError(
            f"{request.dataset}/{request.category}: {request.k_shot}-shot needs {request.k_shot} normal "
            f"train images, found {len(candidates)}"
        )
    ids = tuple(select_reference_ids(candidates, request.k_shot, request.seed))
    key = content_key({
        "format": BANK_FORMAT, "backbone": info.identity_key, "layers": info.identity.get("layers"),
        "preprocess": request.preprocess, "k": request.k_shot, "seed": request.seed, "ids": list(ids),
        "dataset": request.dataset, "category": request.category,
    })
    url = storage.join(config.output, "indexes", request.dataset, request.category, key)
    return BankPlan(request, ids, url)


def read_images(data_url: str, dataset: str, category: str, split: str, image_ids, info: BackboneInfo,
                preprocess: str):
    """Decode the given images of a partition and preprocess them with the `preprocess` preset, in the
    order of `image_ids`."""
    import torch

    from residual_core.images import decode_image
    from residual_core.preprocess import get_preprocess
    from workflows.datasets.reader import read_table

    table = read_table(
        data_url, columns=["image_id", "image"],
        filters=[("dataset", "==", dataset), ("category", "==", category), ("split", "==", split),
                 ("image_id", "in", list(image_ids))],
    )
    by_id = dict(zip(table.column("image_id").to_pylist(), table.column("image").to_pylist(), strict=True))
    missing = [i for i in image_ids if i not in by_id]
    if missing:
        raise ValueError(f"{dataset}/{category}/{split}: images not found: {missing[:5]}")
    preset = get_preprocess(preprocess)
    tensors = [preset.image(decode_image(by_id[i]), info.image_size, info.mean, info.std) for i in image_ids]
    return torch.stack(tensors)


def build_bank_task(backbone_cfg: dict, data_url: str, plan: BankPlan, device: str) -> str:
    """Ray task body: extract features of the references, save the bank, commit it."""
    from residual_core.bank import build_bank, save_bank
    from workflows.pipelines.artifacts import upload_dir
    from workflows.pipelines.models import backbone_info
    from workflows.pipelines.ray_runtime import resolve_device

    if storage.is_committed(plan.url):  # another task (or an earlier run) finished it meanwhile
        return plan.url
    backbone = _cached_backbone(backbone_cfg, resolve_device(device))
    info = backbone_info(backbone)
    req = plan.request
    images = read_images(data_url, req.dataset, req.category, "train", plan.image_ids, info, req.preprocess)
    bank = build_bank(backbone, images.to(next(backbone.parameters()).device), dataset=req.dataset,
                      category=req.category, seed=req.seed, image_ids=list(plan.image_ids))
    with tempfile.TemporaryDirectory(prefix="bank-") as tmp:
        save_bank(bank, tmp)
        upload_dir(tmp, plan.url, {"dataset": req.dataset, "category": req.category, "k_shot": req.k_shot,
                                   "seed": req.seed, "preprocess": req.preprocess,
                                   "image_ids": list(plan.image_ids)})
    return plan.url


_BACKBONES: dict[str, object] = {}


def _cached_backbone(backbone_cfg: dict, device: str):
    import json

    key = json.dumps([backbone_cfg, device], sort_keys=True)
    if key not in _BACKBONES:
        _BACKBONES.clear()
        _BACKBONES[key] = create_backbone_from_config(backbone_cfg, device).eval()
    return _BACKBONES[key]


def ensure_banks(config: RunConfig, requests: list[BankRequest], *,
                 progress: bool = True) -> dict[BankRequest, BankPlan]:
    """Plan every requested bank; build the missing ones (as Ray tasks, or here when they are few images
    on CPUs: `index.local_max_images`); return request -> plan."""
    from workflows.pipelines.ray_runtime import gpus_per_worker

    backbone_cfg = _backbone_dict(config)
    info = probe_backbone(backbone_cfg)
    plans = {req: plan_bank(config, info, req) for req in dict.fromkeys(requests)}
    missing = [plan for plan in plans.values() if not storage.is_committed(plan.url)]
    if not missing:
        return plans
    gpus = gpus_per_worker(config.train.num_gpus)
    if not gpus and sum(len(plan.image_ids) for plan in missing) <= config.index.local_max_images:
        _build_here(backbone_cfg, config, missing, progress)
    else:
        _build_as_tasks(backbone_cfg, config, missing, gpus, progress)
    return plans


def _build_as_tasks(backbone_cfg: dict, config: RunConfig, plans: list[BankPlan], gpus: float,
                    progress: bool) -> None:
    import ray

    from workflows.pipelines.ray_runtime import wait_all

    remote = ray.remote(**bank_task_options(gpus, config.evaluate.max_retries))(build_bank_task)
    refs = [remote.remote(backbone_cfg, config.data.url, plan, config.device) for plan in plans]
    wait_all(refs, f"index: building {len(refs)} bank(s)", progress)


def _build_here(backbone_cfg: dict, config: RunConfig, plans: list[BankPlan], progress: bool) -> None:
    """The bank tasks' body in this process, one bank after another, as a task runs it: on the device a
    CPU task resolves (`auto` is the CPU: a task without GPUs sees none) and with its one torch thread
    (Ray gives a 1-CPU task one; other thread counts sum the convolutions in another order, so the banks
    would differ by float rounding). The model is dropped afterwards."""
    import torch
    from tqdm import tqdm

    device = "cpu" if config.device == "auto" else config.device
    threads = torch.get_num_threads()
    torch.set_num_threads(BANK_TASK_CPUS)
    try:
        for plan in tqdm(plans, desc=f"index: building {len(plans)} bank(s)", disable=not progress,
                         leave=False):
            build_bank_task(backbone_cfg, config.data.url, plan, device)
    finally:
        torch.set_num_threads(threads)
        _BACKBONES.clear()


def bank_task_options(gpus: float, max_retries: int) -> dict:
    """Ray options of the bank tasks. `max_calls=0`: a worker builds bank after bank with its cached
    backbone; Ray's default for a task asking for GPUs is one call per worker process, which gave every
    bank a new process, CUDA context and model (12 s per bank on an H100 machine)."""
    return {"num_cpus": BANK_TASK_CPUS, "num_gpus": gpus, "max_calls": 0, "max_retries": max_retries}


def _backbone_dict(config: RunConfig) -> dict:
    from dataclasses import asdict

    return asdict(config.backbone)


def categories_of(data_url: str, datasets: list[str] | None, categories: list[str] | None,
                  split: str = "test") -> list[tuple[str, str]]:
    """(dataset, category) pairs that have a `split` partition, filtered by the config lists."""
    from workflows.datasets.reader import list_partitions

    pairs = sorted({(d, c) for d, c, s in list_partitions(data_url) if s == split})
    return [(d, c) for d, c in pairs
            if (not datasets or d in datasets) and (not categories or c in categories)]


def run_index(config: RunConfig) -> dict[BankRequest, BankPlan]:
    """The `index` command: banks for every category x k x seed of the configured datasets, preprocessed
    as config.method declares."""
    pairs = categories_of(config.data.url, config.data.datasets, config.data.categories)
    preprocess = method_preprocess(config.method)
    requests = [BankRequest(d, c, k, s, preprocess)
                for d, c in pairs for k in config.index.shots for s in config.index.seeds]
    return ensure_banks(config, requests)
