"""`scan`: score a large unlabeled archive against a few normal references per category.

Steps (each resumable): plan the shards of the input (a raw prefix, streamed, or a Parquet split),
build the reference banks with the `index` machinery, calibrate the per-category thresholds on
held-out normals (scored by the same pipeline) or take a fixed one, then score every shard not yet
committed on the `evaluate` Ray pipeline (`scoring.run_scoring` with scan's stages), and finally sum
the shard markers into a summary. Layout of the output: see `scan_outputs`.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
import uuid
from dataclasses import asdict, dataclass

from tqdm import tqdm

from workflows import storage
from workflows.config import RunConfig, save_config
from workflows.pipelines.calibration import (
    DEFAULT_TARGET_FPR,
    Calibration,
    CategoryThreshold,
    calibrate,
    fixed,
)
from workflows.pipelines.raw_images import (
    DEFAULT_MAX_BYTES,
    DEFAULT_READ_TIMEOUT_S,
    READ_BUFFER_BYTES,
    ScanShard,
    iter_archive_entries,
    plan_archive,
)
from workflows.pipelines.regions import DEFAULT_REGION_LEVEL
from workflows.pipelines.scan_outputs import ScanStore, summarize
from workflows.pipelines.scan_thresholds import describe_origins
from workflows.pipelines.scoring import ScoringJob

REFERENCE_DATASET = "references"
# The scan's pixel limit: 4096 x 4096. MVTec AD / MPDD images are at most 1024 x 1024 (1 Mpx), VisA's
# at most ~1.6 x 1.2 kpx (~2 Mpx); 16 Mpx is 8x that and holds a 12-Mpx camera frame, while one decode
# stays under ~0.5 GB (DECODE_BYTES_PER_PIXEL). JPEGs over it are decoded reduced (DCT 1/2..1/8).
SCAN_MAX_PIXELS = 16 * 2**20
# Peak bytes per decoded pixel of one decode + preprocess, every mode and preset, with a margin
# (measured: 8-bit RGB ~4.5 with the PIL presets, palette/RGBA/CMYK ~9, 16-bit ~8, float ~13,
# `torch-bicubic` ~19-25; tests/workflows/scan/test_scan_hostile.py checks it).
DECODE_BYTES_PER_PIXEL = 32
DECODE_TASK_BASE_BYTES = 512 * 2**20  # a decode worker's own footprint (Python, torch, PIL, Ray)


@dataclass
class ScanOptions:
    """What to scan and how to flag (the rest, backbone/method/batching, comes from the RunConfig)."""

    input: str  # raw image prefix (local dir or s3://) or a Parquet dataset (has _manifest.json)
    output: str  # where plan, results, maps, calibration and summary go
    references: str  # <category>/<images> folder or prefix, or a Parquet dataset's train split
    normals: str | None = None  # held-out normal images, <category>/<images>, for calibration
    target_fpr: float = DEFAULT_TARGET_FPR
    threshold: float | None = None  # fixed score threshold for every category (no calibration)
    thresholds_file: str | None = None  # JSON/YAML {category: threshold}; overrides the rest per category
    thresholds_from: str | None = None  # an earlier scan's output (its calibration), below the file
    category: str | None = None  # raw input: every image belongs to this category
    split: str = "unlabeled"  # Parquet input: the split to scan (labels are ignored)
    shard_size: int = 64
    k_shot: int | None = None  # references per category (None: all given)
    seed: int = 0
    max_pixels: int = SCAN_MAX_PIXELS  # larger images are skipped (JPEGs: decoded reduced if that fits)
    region_level: float = DEFAULT_REGION_LEVEL
    save_maps: bool = True  # heat-map PNGs of flagged images
    max_bytes: int = DEFAULT_MAX_BYTES  # larger files are skipped, unread (size from fstat / the listing)
    read_timeout_s: float = DEFAULT_READ_TIMEOUT_S  # per file: no complete answer in time -> skipped
    jpeg_draft: bool = False  # decode every JPEG at the largest DCT reduction keeping >= 2x the model size
    decode_memory: int | None = None  # Ray `memory` per decode task: None = estimate, 0 = no reservation

    def check(self) -> None:
        if self.threshold is None and not (self.normals or self.thresholds_file or self.thresholds_from):
            raise ValueError("scan: give held-out normals to calibrate (--normals), a fixed --threshold, "
                             "per-category --thresholds FILE or --thresholds-from an earlier scan")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"scan: target FPR must be in [0, 1), got {self.target_fpr}")
        if self.shard_size < 1:
            raise ValueError(f"scan: shard_size must be >= 1, got {self.shard_size}")
        for name in ("max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"scan: {name} must be >= 1, got {getattr(self, name)}")
        if not self.read_timeout_s > 0:
            raise ValueError(f"scan: read timeout must be > 0 seconds, got {self.read_timeout_s}")
        if self.decode_memory is not None and self.decode_memory < 0:
            raise ValueError(f"scan: decode memory must be >= 0 bytes, got {self.decode_memory}")


def decode_task_memory(options: ScanOptions) -> int:
    """Bytes one decode task may use at most: its worker, the read-ahead (`READ_BUFFER_BYTES`, or one
    file alone while its chunks are joined: 2 x max_bytes), the item being decoded (max_bytes) and its
    pixels (max_pixels x DECODE_BYTES_PER_PIXEL). Reserved as Ray's `memory` resource per task unless
    `decode_memory` is given (0: no reservation)."""
    if options.decode_memory is not None:
        return int(options.decode_memory)
    return (DECODE_TASK_BASE_BYTES + max(READ_BUFFER_BYTES, 2 * options.max_bytes) + options.max_bytes
            + DECODE_BYTES_PER_PIXEL * options.max_pixels)


def _fit_to_nodes(memory: int | None) -> int | None:
    """A reservation no node can hold would leave the decode tasks unscheduled for ever: cap it at the
    largest node's `memory` resource (that node then decodes one shard at a time)."""
    if not memory:
        return None
    import ray

    if not ray.is_initialized():
        ray.init()  # what Ray Data would do on first use
    largest = max((node["Resources"].get("memory", 0) for node in ray.nodes() if node.get("Alive")),
                  default=0)
    return int(min(memory, largest)) if largest else int(memory)


def is_parquet_dataset(url: str) -> bool:
    from workflows.datasets.schema import MANIFEST_NAME

    return storage.exists(storage.join(url, MANIFEST_NAME))


# ----------------------------------------------------------------------------- planning
def load_or_plan(input_url: str, plan_url: str, options: ScanOptions) -> list[ScanShard]:
    """The shard plan: reused once committed (so a resumed scan has the same shards), else made."""
    index_url = storage.join(plan_url, "index.jsonl")
    if storage.is_committed(plan_url):
        lines = storage.read_bytes(index_url).decode().splitlines()
        return [ScanShard.from_dict(json.loads(line)) for line in lines if line]
    if is_parquet_dataset(input_url):
        from workflows.pipelines.shards import plan_shards

        shards = [ScanShard(s.dataset, s.category, s.shard_id, s.stop - s.start, parquet=s.to_dict())
                  for s in plan_shards(input_url, split=options.split, shard_size=options.shard_size,
                                       categories=[options.category] if options.category else None)]
    else:
        shards = list(plan_archive(input_url, plan_url, shard_size=options.shard_size,
                                   category=options.category))
    text = "".join(json.dumps(s.to_dict(), sort_keys=True) + "\n" for s in shards)
    storage.atomic_write_bytes(index_url, text.encode())
    storage.mark_success(plan_url, {"shards": len(shards), "images": sum(s.size for s in shards)})
    return shards


# ----------------------------------------------------------------------------- references -> banks
def reference_dataset(options: ScanOptions) -> str:
    """A Parquet dataset holding the references (train split): given, or made from the folder once."""
    if is_parquet_dataset(options.references):
        return options.references
    url = storage.join(options.output, "references")
    if is_parquet_dataset(url):
        return url
    from residual_core.images import ImageDecodeError, probe_size
    from workflows.datasets.writer import write_dataset
    from workflows.ingest.source import SourceTree
    from workflows.pipelines.raw_images import display_key, read_item

    problems: list[dict] = []
    tree = SourceTree(options.references)

    def rows():
        for category, key, size in iter_archive_entries(options.references):
            data, error = read_item(tree, key, size=size, max_bytes=options.max_bytes,
                                    timeout_s=options.read_timeout_s)
            if error is not None:
                problems.append({"source": display_key(key), "reason": error})
                continue
            try:
                width, height = probe_size(data, max_pixels=options.max_pixels)
            except ImageDecodeError as exc:
                problems.append({"source": display_key(key), "reason": exc.reason})
                continue
            yield {"dataset": REFERENCE_DATASET, "category": category, "split": "train", "label": 0,
                   "defect_type": "good", "image": data, "width": width, "height": height,
                   "source": display_key(key)}

    write_dataset(rows(), url, extra_metadata=lambda: {"scan_reference_problems": problems})
    return url


def ensure_reference_banks(config: RunConfig, options: ScanOptions, categories: set[str],
                           progress: bool) -> tuple[dict[str, str], dict[str, list[str]]]:
    """category -> bank URL (and reference ids) for every category that has references."""
    from workflows.datasets.reader import list_partitions
    from workflows.pipelines.index import BankRequest, ensure_banks, normal_train_ids
    from workflows.pipelines.models import method_preprocess

    refs_url = reference_dataset(options)
    preprocess = method_preprocess(config.method)
    by_category: dict[str, str] = {}
    for dataset, category, split in sorted(list_partitions(refs_url)):
        if split == "train" and category in categories:
            by_category.setdefault(category, dataset)
    requests = {}
    for category, dataset in by_category.items():
        available = len(normal_train_ids(refs_url, dataset, category))
        if available:
            requests[category] = BankRequest(dataset, category, min(options.k_shot or available, available),
                                             options.seed, preprocess)
    bank_config = dataclasses.replace(config, output=options.output,
                                      data=dataclasses.replace(config.data, url=refs_url))
    plans = ensure_banks(bank_config, list(requests.values()), progress=progress) if requests else {}
    urls = {c: plans[r].url for c, r in requests.items()}
    ids = {c: list(plans[r].image_ids) for c, r in requests.items()}
    return urls, ids


# ----------------------------------------------------------------------------- scoring
def score_shards(config: RunConfig, job: ScoringJob, shards: list[ScanShard], *, progress: bool,
                 desc: str) -> dict:
    """Score the shards not yet committed under `job.job_url`; progress in images/s with an ETA."""
    from workflows.pipelines import ray_runtime
    from workflows.pipelines.scan_stages import ScanActor, prepare_scan_shard
    from workflows.pipelines.scoring import run_scoring

    done = ScanStore(job.job_url).done_ids()
    todo = [s for s in shards if s.shard_id not in done]
    stats = {"shards_total": len(shards), "shards_resumed": len(shards) - len(todo), "shards_scored": 0,
             "images_this_run": 0, "seconds": 0.0}
    if not todo:
        return stats
    ev = config.evaluate
    plan = ray_runtime.scoring_actors(ev.num_actors, ev.num_gpus_per_actor, ev.actors_per_gpu,
                                      shards=len(todo))
    start = time.perf_counter()
    rows = run_scoring([(job, s) for s in todo], batch_size=ev.batch_size, num_actors=plan.actors,
                       num_gpus_per_actor=plan.gpus, actor_num_cpus=plan.cpus,
                       max_retries=ev.max_retries, prepare_fn=prepare_scan_shard, actor_cls=ScanActor,
                       prepare_memory=_fit_to_nodes(job.extra.get("decode_memory")))
    with tqdm(total=sum(s.size for s in todo), unit="img", desc=desc, disable=not progress,
              mininterval=1.0) as bar:
        for row in rows:
            bar.update(int(row["seen"]))
            stats["shards_scored"] += 1
            stats["images_this_run"] += int(row["seen"])
    stats["seconds"] = time.perf_counter() - start
    return stats


def overlay_scales(calibration: Calibration) -> dict[str, dict]:
    """Per category what its overlays show: threshold, its source and the colour scale (summary.json)."""
    from workflows.reports.overlay import overlay_limits

    out = {}
    for name, entry in sorted(calibration.categories.items()):
        limits = overlay_limits(entry.threshold, entry.normal_median)
        out[name] = {"threshold": entry.threshold, "source": entry.source,
                     "limits": list(limits) if limits else None}
    return out


def make_job(config: RunConfig, job_url: str, banks: dict[str, str], thresholds: dict, options: ScanOptions,
             run_id: str, save_maps: bool, overlays: dict | None = None) -> ScoringJob:
    from workflows.pipelines.models import method_preprocess, probe_backbone

    info = probe_backbone(asdict(config.backbone))
    return ScoringJob(
        job_id=job_url.rstrip("/").rsplit("/", 1)[-1], job_url=job_url, backbone=asdict(config.backbone),
        method=asdict(config.method), banks=banks, preprocess=method_preprocess(config.method),
        device=config.device, image_size=info.image_size, mean=info.mean, std=info.std,
        extra={"thresholds": thresholds, "max_pixels": options.max_pixels, "save_maps": save_maps,
               "region_level": options.region_level, "run_id": run_id, "max_bytes": options.max_bytes,
               "read_timeout_s": options.read_timeout_s, "jpeg_draft": options.jpeg_draft,
               "decode_memory": decode_task_memory(options), "overlays": overlays or {}},
    )


def _bank_keys(shards: list[ScanShard], category_banks: dict[str, str]) -> dict[str, str]:
    """`ScoringActor` looks banks up by "dataset/category": map every planned pair to its category's bank."""
    pairs = {(s.dataset, s.category) for s in shards}
    return {f"{d}/{c}": category_banks[c] for d, c in sorted(pairs) if c in category_banks}


def calibrate_thresholds(config: RunConfig, options: ScanOptions, banks: dict[str, str], run_id: str,
                         progress: bool) -> Calibration:
    """Stored calibration if any (a resumed scan flags exactly as before); else compute and store it:
    the given thresholds (`scan_thresholds`) where they cover a category, the calibration on the
    normals (only if some category is left) or `--threshold` for the rest."""
    from workflows.pipelines.scan_thresholds import apply_given, check_threshold_options

    url = storage.join(options.output, "calibration.json")
    if storage.exists(url):
        return Calibration.from_dict(storage.read_json(url))
    given = check_threshold_options(options, config)
    categories = sorted(banks)
    left = [c for c in categories if c not in given.covered()]
    calibrating = options.threshold is None and bool(options.normals) and bool(left)
    base = Calibration(options.target_fpr if calibrating else None, options.threshold,
                       storage.redact(options.normals) if calibrating else None,
                       asdict(config.method), asdict(config.backbone))
    if options.threshold is not None:
        calibration = fixed(categories, options.threshold, base)
    elif not calibrating:
        calibration = base
        for name in categories:
            calibration.categories[name] = CategoryThreshold(name, None, "none")
    else:
        import numpy as np

        job_url = storage.join(options.output, "calibration")
        shards = load_or_plan(options.normals, storage.join(job_url, "plan"),
                              dataclasses.replace(options, category=None))
        job = make_job(config, job_url, _bank_keys(shards, banks), {}, options, run_id, save_maps=False)
        score_shards(config, job, shards, progress=progress, desc="scan: calibration normals")
        store = ScanStore(job_url)
        scores = {}
        for category in categories:
            table = store.read_table("results", category, columns=["score"])
            scores[category] = np.asarray(table.column("score")) if table.num_rows else np.zeros(0)
        calibration = calibrate(scores, categories, target_fpr=options.target_fpr, base=base)
    calibration = apply_given(calibration, given, categories, thresholds_file=options.thresholds_file,
                              thresholds_from=options.thresholds_from)
    storage.atomic_write_json(url, calibration.to_dict())
    return calibration


# ----------------------------------------------------------------------------- the command
def run_scan(config: RunConfig, options: ScanOptions, *, progress: bool = True) -> dict:
    """Scan (or resume scanning) `options.input`; returns the summary (also stored as summary.json)."""
    options.check()
    summary_url = storage.join(options.output, "summary.json")
    if storage.is_committed(options.output):
        return storage.read_json(summary_url)
    run_id = uuid.uuid4().hex[:12]
    shards = load_or_plan(options.input, storage.join(options.output, "plan"), options)
    categories = {s.category for s in shards}
    banks, reference_ids = ensure_reference_banks(config, options, categories, progress)
    calibration = calibrate_thresholds(config, options, banks, run_id, progress)
    scales = overlay_scales(calibration)
    job = make_job(config, options.output, _bank_keys(shards, banks), calibration.thresholds(), options,
                   run_id, save_maps=options.save_maps, overlays=scales)
    stats = score_shards(config, job, shards, progress=progress, desc="scan")
    store = ScanStore(options.output)
    markers = store.markers()
    missing = {s.shard_id for s in shards} - {m["shard_id"] for m in markers}
    if missing:
        raise RuntimeError(f"scan: {len(missing)} shard(s) did not commit (e.g. {sorted(missing)[0]}); rerun")
    totals = summarize(markers)
    planned = sum(s.size for s in shards)
    summary = {
        **totals, "planned_images": planned, "reconciles": totals["reconciles"] and totals["seen"] == planned,
        "run_id": run_id, "this_run": stats,
        "throughput_images_per_s": stats["images_this_run"] / stats["seconds"] if stats["seconds"] else None,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "calibration": calibration.to_dict(), "thresholds": describe_origins(calibration),
        "overlay_scales": {c: s["limits"] for c, s in scales.items()},
        "overlays": sum(int(m.get("overlays", 0)) for m in markers), "reference_ids": reference_ids,
        "categories_without_references": sorted(categories - set(banks)),
        "options": {**asdict(options), "input": storage.redact(options.input),
                    **{key: storage.redact(value) for key in ("thresholds_file", "thresholds_from")
                       if (value := getattr(options, key))}},
    }
    storage.atomic_write_json(summary_url, summary)
    save_config(config, storage.join(options.output, "config.yaml"))
    storage.mark_success(options.output, {"summary": "summary.json"})
    return summary
