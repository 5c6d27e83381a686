"""Per-category reduce for methods whose maps need statistics of the whole evaluated set.

ResAD++'s default normalisation (the authors' validate.py) subtracts, per feature level, the maximum
log-likelihood over every test image of the category, which no scoring actor sees. For such methods
(`method.set_normaliser()` is not None) the actors commit each shard with its raw per-level outputs
(`raw/<shard>.npz`: feature resolution, bit-packed masks and the rows), an empty metric state and no
scores. Then one Ray task per (job, category) computes the set's statistics (passes over the raw
files, shard by shard), finishes maps and scores batch by batch, rewrites each shard's results, metric
state and maps, and commits `reduced/<dataset>=<category>.json` (with the statistics) last.
A rerun skips committed categories and redoes the others from the same raw files (same outputs), so
the pipeline stays streaming and resumable; nothing per-pixel reaches the driver.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from workflows import storage
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.scoring import ScoringJob
from workflows.pipelines.shard_outputs import ShardOutputs, unpack_raw
from workflows.pipelines.shards import Shard

REDUCE_BATCH = 32  # images finished at once (maps at full resolution: ~6 MB at 224 px)


def _chunks(arrays: dict[str, np.ndarray], count: int) -> Iterator[tuple[int, dict]]:
    import torch

    for start in range(0, count, REDUCE_BATCH):
        stop = start + REDUCE_BATCH
        yield start, {name: torch.from_numpy(value[start:stop]) for name, value in arrays.items()}


def reduce_category(job_json: str, dataset: str, category: str, shard_ids: list[str]) -> dict:
    """Finish one category of one job (a Ray task body); returns the set statistics."""
    from residual_core.methods.set_normalisation import normaliser_from_dict

    job = ScoringJob.from_json(job_json)
    store = ShardStore(job.job_url)
    summaries = {sid: store.summary(sid) for sid in shard_ids}
    normaliser = normaliser_from_dict(summaries[shard_ids[0]]["normaliser"])

    def batches():
        for sid in shard_ids:
            arrays, _, kept, _ = unpack_raw(store.raw(sid))
            for _, raw in _chunks(arrays, len(kept)):
                yield raw

    stats = normaliser.statistics(batches)
    for sid in shard_ids:
        arrays, masks, kept, skipped = unpack_raw(store.raw(sid))
        outputs = ShardOutputs(job, kept)
        for start, raw in _chunks(arrays, len(kept)):
            outputs.add(start, normaliser.finish(raw, stats), masks[start:start + REDUCE_BATCH])
        outputs.rewrite(store, Shard.from_dict(summaries[sid]["shard"]), skipped)
    record = {"dataset": dataset, "category": category, "shards": len(shard_ids),
              "normaliser": normaliser.to_dict(), "statistics": stats}
    storage.atomic_write_json(store.reduced_url(dataset, category), record)
    return record


def pending_reduces(job: ScoringJob, shards: list[Shard]) -> list[tuple[str, str, list[str]]]:
    """(dataset, category, shard ids) of the job's set-normalised categories not yet reduced."""
    store = ShardStore(job.job_url)
    by_category: dict[tuple[str, str], list[str]] = {}
    for shard in shards:
        by_category.setdefault((shard.dataset, shard.category), []).append(shard.shard_id)
    pending = []
    for (dataset, category), ids in sorted(by_category.items()):
        if "normaliser" not in store.summary(ids[0]):
            continue  # the method finishes its maps per batch
        if not storage.exists(store.reduced_url(dataset, category)):
            pending.append((dataset, category, ids))
    return pending


def run_reduces(jobs: list[tuple[ScoringJob, list[Shard]]], *, max_retries: int = 3,
                progress: bool = True) -> int:
    """Reduce every pending category of every job as parallel Ray tasks; returns how many ran."""
    import ray

    from workflows.pipelines.ray_runtime import wait_all

    tasks = [(job, *item) for job, shards in jobs for item in pending_reduces(job, shards)]
    if not tasks:
        return 0
    remote = ray.remote(num_cpus=1, max_retries=max_retries)(reduce_category)
    refs = [remote.remote(job.to_json(), dataset, category, ids) for job, dataset, category, ids in tasks]
    wait_all(refs, f"evaluate: reduce {len(refs)} categories", progress)
    return len(refs)
