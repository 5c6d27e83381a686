"""Each evaluated category's counts and metrics, computed on driver threads as soon as they can be.

`evaluate` finishes a job by merging each category's shard metric states and computing its metrics
(numpy sorts and searches over up to `pixel_capacity` distinct scores: about half a second to a second
per category). Done one category after another once the pipeline has ended, that time was added to
every run. Here a category is finished on a small thread pool as soon as its last shard is committed,
while the pipeline scores later categories and in its tail, where some actors are already idle
(numpy releases the GIL in the sorts, so the threads also run beside each other).

A category of a set-normalised method (`set_reduce`) holds no metric state until its reduce step has
committed: it is finished after the reduces (`finish_remaining`), all such categories at once on the
same pool. Results are the same as one merge in shard order after the pipeline: only when they are
computed changes. A failure is raised when the job collects its categories (`collect`).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from workflows import storage
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.metric_groups import category_metrics
from workflows.pipelines.scoring import ScoringJob
from workflows.pipelines.shards import Shard

FINISH_THREADS = 2  # categories finished at once on the driver


@dataclass
class CategoryResult:
    """One category of one job: its image counts and metrics (`metric_groups.category_metrics`)."""

    images: int
    skipped: int
    metrics: dict
    per_defect_type: dict[str, dict]


def finish_category(job: ScoringJob, name: str, shards: list[Shard]) -> CategoryResult | None:
    """Merge the category's committed shard states (in shard order) and compute its metrics; None when
    they are not there yet: a set-normalised category whose reduce step has not committed."""
    from residual_core.metrics import GroupedAccumulator

    store = ShardStore(job.job_url)
    summaries = [store.summary(shard.shard_id) for shard in shards]
    dataset, category = name.split("/", 1)
    if "normaliser" in summaries[0] and not storage.exists(store.reduced_url(dataset, category)):
        return None
    merged = None
    for shard in shards:
        state = GroupedAccumulator.from_state_dict(store.state(shard.shard_id))
        merged = state if merged is None else merged.merge(state)
    metrics, per_type = category_metrics(merged, bool(job.pixel_gt.get(name)))
    return CategoryResult(sum(s["images"] for s in summaries), sum(s["skipped"] for s in summaries),
                          metrics, per_type)


class CategoryFinisher:
    """Finishes the categories of several jobs on `threads` driver threads, each as soon as every one of
    its shards is committed: `shard_committed` for each shard the pipeline delivers, `finish_remaining` after
    the reduce step, then `collect` per job. Shards committed by an earlier run count from the start."""

    def __init__(self, jobs: list[tuple[ScoringJob, list[Shard]]], committed: dict[str, set[str]],
                 threads: int = FINISH_THREADS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="finish")
        self._jobs: dict[str, ScoringJob] = {}
        self._shards: dict[tuple[str, str], list[Shard]] = {}  # (job id, category) -> shards in order
        self._waiting: dict[tuple[str, str], set[str]] = {}  # shard ids not yet committed
        self._futures: dict[tuple[str, str], Future] = {}
        for job, shards in jobs:
            if job.job_id in self._jobs:  # the same job asked for twice: its shards count once
                continue
            self._jobs[job.job_id] = job
            for shard in shards:
                key = (job.job_id, f"{shard.dataset}/{shard.category}")
                self._shards.setdefault(key, []).append(shard)
                if shard.shard_id not in committed.get(job.job_id, set()):
                    self._waiting.setdefault(key, set()).add(shard.shard_id)
        for key in self._shards:
            if key not in self._waiting:
                self._submit(key)

    def _submit(self, key: tuple[str, str]) -> None:
        job_id, name = key
        self._futures[key] = self._pool.submit(finish_category, self._jobs[job_id], name, self._shards[key])

    @property
    def started(self) -> set[str]:
        """Names of the categories (of any job) whose finishing has started."""
        return {name for _, name in self._futures}

    def shard_committed(self, job_id: str, dataset: str, category: str, shard_id: str) -> None:
        """A shard of the job was committed; its category starts finishing when it was the last one."""
        key = (job_id, f"{dataset}/{category}")
        waiting = self._waiting.get(key)
        if waiting is None or shard_id not in waiting:
            return
        waiting.discard(shard_id)
        if not waiting:
            del self._waiting[key]
            self._submit(key)

    def finish_remaining(self) -> None:
        """After the reduce step: start again every category that was waiting for its reduce. (A category
        still waiting for shards has lost them: the job reports them missing and is not collected.)"""
        for key, future in list(self._futures.items()):
            if future.exception() is None and future.result() is None:  # waits for a running one
                self._submit(key)

    def collect(self, job: ScoringJob) -> dict[str, CategoryResult]:
        """The job's categories, sorted by name; raises a category's failure. A category still None after
        `finish_remaining` (its reduce never committed) is an error."""
        out = {}
        for (job_id, name), future in sorted(self._futures.items()):
            if job_id != job.job_id:
                continue
            result = future.result()
            if result is None:
                raise RuntimeError(f"job {job.job_id}: category {name} has no reduced metric state")
            out[name] = result
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CategoryFinisher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
