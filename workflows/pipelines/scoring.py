"""The reusable scoring pipeline: shards of image rows -> per-image results + metric states.

Ray Data runs two stages over a list of (job, shard) tasks:
1. `prepare_shard` (CPU tasks): read the shard's needed columns, decode and preprocess images and
   masks; a corrupt image becomes a skipped row with its reason. The shard crosses Ray as numpy
   columns (`prepared.PreparedShard`): uint8 pixels where the preset allows it, uint8 masks.
2. `ScoringActor` (actor pool, `num_gpus` per actor when GPUs exist): caches backbones, methods and
   per-category banks, scores in batches of `batch_size`, reduces anomaly maps into a
   `GroupedAccumulator` per shard (the normals and each defect type apart, `metric_groups`), commits
   the shard's outputs, and returns a small summary. Each batch's reduction runs on one background
   thread (`background.SerialWorker`, in order, bounded) while the next batch is scored. On a GPU
   actor the maps are reduced and folded on the device (`residual_core.metrics.device_fold`), and the
   actor runs two shard calls at once: one shard commits while the next is scored.
Nothing per-pixel reaches the driver. `evaluate` uses it; so can `scan`.
"""

from __future__ import annotations

import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from workflows.pipelines.background import SerialWorker
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.prepared import PreparedShard, RowStack, image_input, image_rows, model_input
from workflows.pipelines.shard_outputs import ShardOutputs, pack_raw
from workflows.pipelines.shards import Shard, read_shard

REMOTE_ARGS_DEPRECATION = r"`ray_remote_args` is deprecated"
CALLS_PER_GPU_ACTOR = 2  # shard calls a GPU actor runs at once: one scoring, one committing


@dataclass
class ScoringJob:
    """Everything an actor needs to score shards of one (method, checkpoint, k, seed) evaluation."""

    job_id: str
    job_url: str  # where the shard outputs go
    backbone: dict  # BackboneConfig as dict: spec, layers, image_size
    method: dict  # MethodConfig as dict: name, params, checkpoint
    banks: dict[str, str]  # "dataset/category" -> bank URL
    preprocess: str | None = None  # residual_core.preprocess preset; None: the method's (resolved here)
    device: str = "auto"
    image_size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    save_maps: str = "none"  # none | sample | all
    map_sample_fraction: float = 0.1
    map_dtype: str = "float16"  # saved maps: float16 (small) or float32 (exact)
    # "dataset/category" -> whether its test images have pixel ground truth (dataset manifest); where
    # they have, normal images count with all-zero masks in every pixel metric (the MVTec AD protocol)
    pixel_gt: dict[str, bool] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.preprocess is None:
            if not self.method.get("name"):
                raise ValueError(f"job {self.job_id}: no preprocess preset and no method to take it from")
            from workflows.pipelines.models import method_preprocess

            self.preprocess = method_preprocess(self.method)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ScoringJob:
        return cls(**json.loads(text))


def prepare_shard(task: dict) -> dict:
    """Stage 1 (CPU): read one shard and preprocess it with the job's preset into one Ray Data row of
    numpy columns (`PreparedShard.to_row`)."""
    from residual_core.images import decode_image, decode_mask
    from residual_core.preprocess import get_preprocess

    job = ScoringJob.from_json(task["job"])
    shard = Shard.from_dict(json.loads(task["shard"]))
    preset = get_preprocess(job.preprocess)
    table = read_shard(shard).to_pylist()
    size = job.image_size
    pixel_gt = job.pixel_gt.get(f"{shard.dataset}/{shard.category}", False)
    images, masks = image_rows(preset, size, len(table)), RowStack((size, size), bool, len(table))
    kept, skipped = [], []
    for row in table:
        try:
            image = decode_image(row["image"])
            mask = None if row["mask"] is None else decode_mask(row["mask"], image.size)
            pixels, mask = image_input(preset, image, job), preset.mask_array(mask, size)
        except Exception as exc:  # noqa: BLE001 - any unreadable row is recorded, the run goes on
            skipped.append({**_meta(row), "skip_reason": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        images.append(pixels)
        masks.append(mask)
        kept.append({**_meta(row), "has_mask": has_pixel_truth(row, pixel_gt)})
    return PreparedShard(images.array(), kept, skipped, masks.array().view(np.uint8)).to_row(task)


def has_pixel_truth(row: dict, pixel_gt: bool) -> bool:
    """Whether a row counts in the pixel metrics: in a dataset with pixel ground truth, its anomalous
    images with a mask and its normal images (all-zero mask); an anomalous image without a mask
    counts for the image metrics only."""
    return pixel_gt and (row["mask"] is not None or row["label"] == 0)


def _meta(row: dict) -> dict:
    return {"image_id": row["image_id"], "label": row["label"], "defect_type": row["defect_type"],
            "source": row["source"]}


class ScoringActor:
    """Stage 2: scores prepared shards; caches models and banks across calls. `num_cpus`: the actor's CPU
    share, which sets its torch threads (`ray_runtime.torch_threads`); None (in-process use) leaves
    them as they are."""

    def __init__(self, batch_size: int = 8, max_cached: int = 2, num_cpus: float | None = None) -> None:
        import torch

        self._scoring = threading.Lock()  # one shard scored at a time; another may commit meanwhile
        self._caching = threading.RLock()  # the caches below, read and filled by concurrent calls
        if num_cpus is not None:
            from workflows.pipelines.ray_runtime import torch_threads

            torch.set_num_threads(torch_threads(num_cpus))
        self.batch_size = int(batch_size)
        self.max_cached = max_cached
        self._backbones: OrderedDict = OrderedDict()
        self._methods: OrderedDict = OrderedDict()
        self._banks: OrderedDict = OrderedDict()

    def _device(self, job: ScoringJob) -> str:
        from workflows.pipelines.ray_runtime import resolve_device

        return resolve_device(job.device)

    @staticmethod
    def _remember(cache: OrderedDict, key, value, limit: int):
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > limit:
            cache.popitem(last=False)
        return value

    def _method(self, job: ScoringJob):
        key = json.dumps([job.backbone, job.method, job.device], sort_keys=True)
        with self._caching:
            if key in self._methods:
                self._methods.move_to_end(key)
                return self._methods[key]
            from workflows.pipelines.models import load_method

            method = load_method(job.backbone, job.method, self._device(job), self._backbones)
            return self._remember(self._methods, key, method, self.max_cached)

    def _bank(self, job: ScoringJob, shard: Shard, device: str):
        name = f"{shard.dataset}/{shard.category}"
        if name not in job.banks:
            raise KeyError(f"job {job.job_id}: no reference bank for {name}")
        return self.bank_at(job.banks[name], device)

    def bank_at(self, url: str, device: str):
        """The committed bank at `url` on `device` (cached)."""
        with self._caching:
            if url in self._banks:
                self._banks.move_to_end(url)
                return self._banks[url]
            from workflows.pipelines.models import load_bank_url

            return self._remember(self._banks, url, load_bank_url(url, device), 4 * self.max_cached)

    def scored_batches(self, job: ScoringJob, shard, images: np.ndarray, *, raw: bool = False) -> Iterator:
        """The one batch loop of evaluate and scan: `(start, stop, output)` per batch of `batch_size`
        prepared images [N, 3, S, S] (uint8 pixels or normalised float32: `prepared`), scored by the
        job's cached method against the shard's cached bank; `output` is a ScoreOutput, or with `raw`
        the method's `score_raw` arrays."""
        if len(images) == 0:
            return
        yield from self.batches_against(job, self._bank(job, shard, self._device(job)), images, raw=raw)

    def batches_against(self, job: ScoringJob, bank, images: np.ndarray, *, raw: bool = False) -> Iterator:
        """`scored_batches` against a given (already loaded or just built) bank: the same loop, for
        local scoring on the driver (`local_scoring`) as well as the actors."""
        import torch

        method = self._method(job)
        score = method.score_raw if raw else method.score
        for start in range(0, len(images), self.batch_size):
            stop = min(start + self.batch_size, len(images))
            with torch.no_grad():  # grad mode is per thread: set here, whichever thread calls
                out = score(model_input(images[start:stop], job.mean, job.std, method.device), bank)
            yield start, stop, out

    def score_shard(self, job: ScoringJob, shard, images: np.ndarray, reduce_batch, *,
                    raw: bool = False) -> None:
        """The actors' shard loop: every batch of `scored_batches` handed to `reduce_batch(start, stop,
        output)` on one background thread (in order; batch i reduced while batch i + 1 is scored), all
        reduced when this returns. One shard at a time is scored: on an actor that runs two calls at once
        (`CALLS_PER_GPU_ACTOR`), one shard's commit overlaps the next one's scoring."""
        with self._scoring, SerialWorker() as reducer:
            for start, stop, out in self.scored_batches(job, shard, images, raw=raw):
                reducer.submit(reduce_batch, start, stop, out)
            reducer.join()  # every batch reduced (a failure raised here) before the commit

    def __call__(self, task: dict) -> dict:
        job = ScoringJob.from_json(task["job"])
        shard = Shard.from_dict(json.loads(task["shard"]))
        prepared = PreparedShard.from_row(task)
        kept, skipped = prepared.kept, prepared.skipped
        normaliser = self._method(job).set_normaliser()  # known even for a shard with nothing to score
        outputs = ShardOutputs(job, kept)
        raw_parts: dict[str, list[np.ndarray]] = {}

        def reduce_batch(start: int, stop: int, out) -> None:
            if normaliser is None:
                outputs.add(start, out, prepared.masks[start:stop])
            else:  # finished per category by the reduce step
                _keep_raw(raw_parts, out)

        self.score_shard(job, shard, prepared.images, reduce_batch, raw=normaliser is not None)
        summary = {"images": len(kept), "skipped": len(skipped),
                   "skip_reasons": [s["skip_reason"] for s in skipped][:20]}
        raw = None
        if normaliser is not None:
            summary["normaliser"] = normaliser.to_dict()
            raw = pack_raw({k: np.concatenate(v) for k, v in raw_parts.items()}, prepared.masks, kept,
                           skipped)
        outputs.commit(ShardStore(job.job_url), shard, skipped, summary, raw)
        return {"job_id": job.job_id, "shard_id": shard.shard_id, "dataset": shard.dataset,
                "category": shard.category, "summary": json.dumps(summary)}


def _keep_raw(parts: dict[str, list[np.ndarray]], out: dict) -> None:
    """A set-normalised method's raw batch outputs, on the CPU, appended per name."""
    for name, value in out.items():
        parts.setdefault(name, []).append(value.detach().float().cpu().numpy())


def run_scoring(
    tasks: list[tuple[ScoringJob, Shard]],
    *,
    batch_size: int,
    num_actors: int,
    num_gpus_per_actor: float,
    actor_num_cpus: float = 1.0,
    max_retries: int = 3,
    prepare_fn=None,
    actor_cls=None,
    prepare_memory: int | None = None,
    calls_per_actor: int | None = None,
) -> Iterator[dict]:
    """Run the two-stage Ray Data pipeline over `tasks`; yields one small summary per shard.

    `prepare_fn` / `actor_cls` (default `prepare_shard` / `ScoringActor`) let `scan` reuse the same
    pipeline with its own row source and outputs; its shards need `to_dict()` like `Shard`.
    `prepare_memory`: bytes of Ray's `memory` resource each prepare (decode) task reserves, so a node
    runs only as many decodes at once as its memory holds (None: no reservation). `actor_num_cpus`:
    each actor's CPU share (`ray_runtime.actor_cpus`), also its torch threads. `calls_per_actor`: shard
    calls each actor runs at once (None: `calls_at_once`)."""
    import ray

    if not tasks:
        return
    items = [{"job": job.to_json(), "shard": json.dumps(shard.to_dict())} for job, shard in tasks]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    # Bounded retries (Ray Data's default is unbounded): a failing task or actor is retried, then fails.
    # Ray 2.60 has no named parameter for them: they go as remote args, which 2.60 marks deprecated
    # (removed in 2.64, above the version range pyproject allows); that one warning is silenced here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=REMOTE_ARGS_DEPRECATION)
        prepared = dataset.map(prepare_fn or prepare_shard, num_cpus=0.5, memory=prepare_memory or None,
                               max_retries=max_retries)
        scored = prepared.map(
            actor_cls or ScoringActor,
            fn_constructor_kwargs={"batch_size": batch_size, "num_cpus": actor_num_cpus},
            compute=actor_pool(num_actors, calls_per_actor or calls_at_once(num_gpus_per_actor)),
            **actor_resources(num_gpus_per_actor, actor_num_cpus),
            max_restarts=max_retries,
            max_task_retries=max_retries,
        )
    yield from scored.iter_rows()


def calls_at_once(num_gpus: float) -> int:
    """Shard calls an actor runs at once: a GPU actor `CALLS_PER_GPU_ACTOR` (one scores while the other
    commits: `ScoringActor.score_shard`), a CPU actor one (its threads are its CPUs)."""
    return CALLS_PER_GPU_ACTOR if num_gpus else 1


def actor_pool(num_actors: int, calls: int):
    """A fixed pool of `num_actors` scoring actors, each running `calls` shard calls at once."""
    import ray

    return ray.data.ActorPoolStrategy(size=max(1, int(num_actors)), max_concurrent_calls_per_actor=calls,
                                      enable_true_multi_threading=calls > 1)


def actor_resources(num_gpus: float, num_cpus: float) -> dict:
    """The scoring actors' Ray resources. A GPU actor names only its GPUs: Ray Data then reserves its
    default of 1 CPU beside them (the share `evaluate` and `scan` give a GPU actor) and does not print,
    every run, that naming both "is experimental"."""
    return {"num_gpus": num_gpus} if num_gpus else {"num_cpus": num_cpus}
