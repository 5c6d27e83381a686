"""`evaluate`: score the `test` split with a method, k-shot and seed; metrics per category and dataset.

Several evaluations (e.g. all k x seeds of a lodo fold) share one Ray Data pipeline, so actors load
a model once and reuse it. Each evaluation ("job") writes under its own content-addressed directory:
per-shard outputs (see `resume`), then `metrics.json`, the resolved `config.yaml` and `_SUCCESS`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from residual_core.metrics import IMAGE_METRICS, pixel_metric_names, summarize_dataset  # noqa: E402
from workflows import storage
from workflows.config import MethodConfig, RunConfig, save_config
from workflows.datasets.reader import pixel_ground_truth
from workflows.pipelines.category_results import CategoryFinisher
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.index import BankRequest, categories_of, ensure_banks
from workflows.pipelines.metric_groups import NO_PIXEL_TRUTH, category_metrics  # noqa: F401 - re-exported
from workflows.pipelines.models import content_key, method_preprocess, probe_backbone
from workflows.pipelines.scoring import ScoringJob, run_scoring
from workflows.pipelines.set_reduce import pending_reduces, run_reduces
from workflows.pipelines.shards import Shard, plan_shards

METRIC_NAMES = (*IMAGE_METRICS, *pixel_metric_names(0.3))
# Version of the evaluation protocol, part of every job key so that results of an older protocol are
# never reused: 2 = normal images count with all-zero masks in pixel metrics where the dataset has
# pixel ground truth (MVTec AD protocol); ResAD++ maps finished per category (authors' normalisation).
# 3 = shard metric states grouped (normals, each defect type): per-defect-type metrics.
EVAL_PROTOCOL = 3


@dataclass(frozen=True)
class EvalSpec:
    """One evaluation: a method (and checkpoint) at k shots and one seed on some datasets."""

    datasets: tuple[str, ...]
    method: MethodConfig
    k_shot: int
    seed: int

    def __hash__(self) -> int:  # MethodConfig holds a dict: hash the JSON form
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))

    def label(self) -> str:
        return f"{'+'.join(self.datasets)}|{self.method.name}|k={self.k_shot}|seed={self.seed}"


@dataclass
class EvalResult:
    spec: EvalSpec
    job_url: str
    per_category: dict[str, dict]  # "dataset/category" -> metrics dict (compute() output, floats)
    per_dataset: dict[str, dict[str, float | None]]  # dataset -> mean over categories
    counts: dict[str, int]  # images, skipped, shards
    reference_ids: dict[str, list[str]] = field(default_factory=dict)  # "dataset/category" -> ids
    resumed_shards: int = 0
    completed: bool = True
    # "dataset/category" -> defect type -> metrics of that type's images against the category's normals
    # (shaped like per_category entries)
    per_defect_type: dict[str, dict[str, dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["spec"] = {"datasets": list(self.spec.datasets), "method": asdict(self.spec.method),
                       "k_shot": self.spec.k_shot, "seed": self.spec.seed}
        return out


def job_url_for(config: RunConfig, spec: EvalSpec, identity_key: str) -> str:
    key = content_key({
        "data": config.data.url, "datasets": list(spec.datasets), "categories": config.data.categories,
        "backbone": identity_key, "method": asdict(spec.method), "preprocess": method_preprocess(spec.method),
        "k": spec.k_shot, "seed": spec.seed, "shard_size": config.evaluate.shard_size,
        "protocol": EVAL_PROTOCOL,
        "maps": [config.evaluate.save_maps, config.evaluate.map_sample_fraction, config.evaluate.map_dtype],
    })
    return storage.join(config.output, "evaluate", key)


def run_evaluations(config: RunConfig, specs: list[EvalSpec], *, progress: bool = True) -> list[EvalResult]:
    """Evaluate every spec; completed jobs are reused, interrupted ones resume shard by shard."""
    from workflows.pipelines import ray_runtime

    backbone_cfg = asdict(config.backbone)
    info = probe_backbone(backbone_cfg)
    ev = config.evaluate
    jobs: list[tuple[EvalSpec, ScoringJob, list[Shard]]] = []
    all_requests = []
    per_spec_pairs, preprocess = {}, {}
    for spec in specs:
        pairs = categories_of(config.data.url, list(spec.datasets), config.data.categories)
        if not pairs:
            where = storage.redact(config.data.url)
            raise ValueError(f"{spec.label()}: no test partitions found under {where}")
        per_spec_pairs[spec] = pairs
        preprocess[spec] = method_preprocess(spec.method)
        all_requests += [BankRequest(d, c, spec.k_shot, spec.seed, preprocess[spec]) for d, c in pairs]
    plans = ensure_banks(config, all_requests, progress=progress)
    pixel_gt = {f"{d}/{c}": flag for (d, c), flag in pixel_ground_truth(config.data.url).items()}
    for spec in specs:
        job_url = job_url_for(config, spec, info.identity_key)
        banks = {f"{d}/{c}": plans[BankRequest(d, c, spec.k_shot, spec.seed, preprocess[spec])].url
                 for d, c in per_spec_pairs[spec]}
        job = ScoringJob(
            job_id=job_url.rsplit("/", 1)[-1], job_url=job_url, backbone=backbone_cfg,
            method=asdict(spec.method), banks=banks, preprocess=preprocess[spec], device=config.device,
            image_size=info.image_size, mean=info.mean, std=info.std, save_maps=ev.save_maps,
            map_sample_fraction=ev.map_sample_fraction, map_dtype=ev.map_dtype,
            pixel_gt={name: pixel_gt.get(name, False) for name in banks},
        )
        shards = [] if storage.is_committed(job_url) else plan_shards(
            config.data.url, split="test", shard_size=ev.shard_size, datasets=list(spec.datasets),
            categories=config.data.categories or None)
        jobs.append((spec, job, shards))

    tasks, resumed, committed = [], {}, {}
    for _spec, job, shards in jobs:
        committed[job.job_id] = ShardStore(job.job_url).done_ids() if shards else set()
        resumed[job.job_id] = sum(1 for s in shards if s.shard_id in committed[job.job_id])
        tasks += [(job, s) for s in shards if s.shard_id not in committed[job.job_id]]
    if ev.stop_after_shards is not None:  # test hook: simulate an interruption
        tasks = tasks[: ev.stop_after_shards]
    open_jobs = [(job, shards) for _, job, shards in jobs if not storage.is_committed(job.job_url)]
    with CategoryFinisher(open_jobs, committed) as finisher:  # categories finished while others score
        if tasks:
            plan = ray_runtime.scoring_actors(ev.num_actors, ev.num_gpus_per_actor, ev.actors_per_gpu,
                                              shards=len(tasks))
            rows = run_scoring(tasks, batch_size=ev.batch_size, num_actors=plan.actors,
                               num_gpus_per_actor=plan.gpus, actor_num_cpus=plan.cpus,
                               max_retries=ev.max_retries)
            for row in tqdm(rows, total=len(tasks), desc="evaluate: shards", disable=not progress,
                            leave=False):
                finisher.shard_committed(row["job_id"], row["dataset"], row["category"], row["shard_id"])
        if ev.stop_after_shards is not None:
            return [_partial(spec, job) for spec, job, _ in jobs]
        run_reduces([(job, shards) for _, job, shards in jobs], max_retries=ev.max_retries,
                    progress=progress)
        finisher.finish_remaining()
        results = []
        for spec, job, shards in jobs:
            refs = {name: list(plans[BankRequest(*name.split("/"), spec.k_shot, spec.seed,
                                                 job.preprocess)].image_ids) for name in job.banks}
            results.append(_finalize(config, spec, job, shards, refs, resumed.get(job.job_id, 0), finisher))
    return results


def stored_eval_result(job_url: str) -> EvalResult:
    """The result of a committed job, from its `metrics.json` (what `log-results` logs)."""
    saved = storage.read_json(storage.join(job_url, "metrics.json"))
    spec = saved.get("spec", {})
    method = MethodConfig(**spec.get("method", {"name": "?"}))
    counts = saved.get("counts", {})
    eval_spec = EvalSpec(tuple(spec.get("datasets", [])), method, spec.get("k_shot"), spec.get("seed"))
    result = EvalResult(eval_spec, job_url, saved["per_category"], saved["per_dataset"], counts,
                        saved.get("reference_ids", {}), resumed_shards=counts.get("shards", 0))
    if saved.get("per_defect_type"):  # jobs scored with per-defect-type metrics
        result.per_defect_type = saved["per_defect_type"]
    return result


def _partial(spec: EvalSpec, job: ScoringJob) -> EvalResult:
    done = ShardStore(job.job_url).done_ids()
    return EvalResult(spec, job.job_url, {}, {}, {"shards": len(done)}, completed=False)


def _finalize(config: RunConfig, spec: EvalSpec, job: ScoringJob, shards: list[Shard],
              refs: dict[str, list[str]], resumed: int, finisher: CategoryFinisher) -> EvalResult:
    """Collect the job's finished categories (`category_results`), then compute and commit its metrics."""
    metrics_url = storage.join(job.job_url, "metrics.json")
    if storage.is_committed(job.job_url):
        saved = storage.read_json(metrics_url)
        return EvalResult(spec, job.job_url, saved["per_category"], saved["per_dataset"], saved["counts"],
                          saved.get("reference_ids", refs), resumed_shards=saved["counts"]["shards"],
                          per_defect_type=saved.get("per_defect_type", {}))
    store = ShardStore(job.job_url)
    done = store.done_ids()
    missing = [s.shard_id for s in shards if s.shard_id not in done]
    if missing:
        raise RuntimeError(f"{spec.label()}: {len(missing)} shard(s) did not complete (e.g. {missing[0]})")
    unreduced = pending_reduces(job, shards)
    if unreduced:
        raise RuntimeError(f"{spec.label()}: {len(unreduced)} categories were not reduced "
                           f"(e.g. {unreduced[0][0]}/{unreduced[0][1]})")
    categories = finisher.collect(job)
    counts = {"images": sum(c.images for c in categories.values()),
              "skipped": sum(c.skipped for c in categories.values()), "shards": len(shards)}
    per_category = {name: c.metrics for name, c in categories.items()}
    per_defect_type = {name: c.per_defect_type for name, c in categories.items()}
    per_dataset = dataset_means(per_category)
    payload = {"per_category": per_category, "per_dataset": per_dataset, "counts": counts,
               "per_defect_type": per_defect_type, "reference_ids": refs,
               "spec": EvalResult(spec, "", {}, {}, {}).to_dict()["spec"], "preprocess": job.preprocess,
               # how the job scored (model, banks, preset): galleries recompute the maps they show
               "scoring_job": asdict(job)}
    storage.atomic_write_json(metrics_url, payload)
    save_config(config, storage.join(job.job_url, "config.yaml"))
    storage.mark_success(job.job_url, {"metrics": "metrics.json"})
    return EvalResult(spec, job.job_url, per_category, per_dataset, counts, refs, resumed_shards=resumed,
                      per_defect_type=per_defect_type)


def dataset_means(per_category: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Per dataset: mean of each metric over the categories where it is defined (None if nowhere)."""
    grouped: dict[str, dict[str, dict]] = {}
    for name, metrics in per_category.items():
        grouped.setdefault(name.split("/", 1)[0], {})[name] = metrics
    return {dataset: {m: summarize_dataset(rows).get(m) for m in METRIC_NAMES}
            for dataset, rows in grouped.items()}


def run_evaluate(config: RunConfig, *, progress: bool = True) -> list[EvalResult]:
    """The `evaluate` command: configured datasets x index.shots x index.seeds with config.method."""
    datasets = config.data.datasets or sorted({d for d, _ in categories_of(config.data.url, None, None)})
    specs = [EvalSpec(tuple(datasets), config.method, k, s)
             for k in config.index.shots for s in config.index.seeds]
    return run_evaluations(config, specs, progress=progress)
