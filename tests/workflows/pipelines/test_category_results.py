"""Categories finished on driver threads while the pipeline goes on (`category_results`):

- a category starts finishing when its last shard is committed (shards of earlier runs count from the
  start) and its result is the merge of its shards in order, as a merge after the pipeline gives;
- a set-normalised category waits for its reduce step and is finished after it; never reduced, or a
  failure while finishing, is raised when the job collects its categories.
"""

from __future__ import annotations

import pickle
import threading

import numpy as np
import pyarrow as pa
import pytest

from residual_core.metrics import GroupedAccumulator
from workflows import storage
from workflows.pipelines import category_results
from workflows.pipelines.category_results import CategoryFinisher, finish_category
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.metric_groups import category_metrics, group_of
from workflows.pipelines.scoring import ScoringJob
from workflows.pipelines.shards import Shard

SIZE = 8  # map side
SHARDS_PER_CATEGORY = 3
IMAGES_PER_SHARD = 4


def _shard(category: str, index: int) -> Shard:
    return Shard("textures", category, "test", f"file-{category}", f"{category}.parquet", 100,
                 index * IMAGES_PER_SHARD, (index + 1) * IMAGES_PER_SHARD)


def _commit(store: ShardStore, shard: Shard, seed: int, extra: dict | None = None) -> GroupedAccumulator:
    """A committed shard: a grouped metric state of random scores and maps (one normal, one defect type)."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (IMAGES_PER_SHARD // 2))
    masks = np.zeros((IMAGES_PER_SHARD, SIZE, SIZE), bool)
    masks[labels == 1, :2, :3] = True
    maps = (rng.random((IMAGES_PER_SHARD, SIZE, SIZE)) + masks).astype(np.float32)
    grouped = GroupedAccumulator()
    scores = rng.random(IMAGES_PER_SHARD) + labels
    grouped.update([group_of(int(label), "scratch") for label in labels], scores, labels, maps, masks)
    store.write_outputs(shard.shard_id, pa.table({"image_id": ["x"]}), grouped.state_dict(), None)
    store.commit_marker(shard.shard_id, {"shard": shard.to_dict(), "images": IMAGES_PER_SHARD,
                                         "skipped": 1, **(extra or {})})
    return grouped


def _commit_all(job: ScoringJob, shards: list[Shard], extra: dict | None = None) -> list[GroupedAccumulator]:
    """Every shard committed (seeded by its position), as an earlier run leaves them; their states."""
    store = ShardStore(job.job_url)
    return [_commit(store, shard, seed=i, extra=extra) for i, shard in enumerate(shards)]


def _all_committed(job: ScoringJob, shards: list[Shard]) -> dict[str, set[str]]:
    return {job.job_id: {s.shard_id for s in shards}}


@pytest.fixture
def job_and_shards(tmp_path):
    job = ScoringJob(job_id="job", job_url=str(tmp_path / "job"), backbone={}, method={"name": "baseline"},
                     banks={}, pixel_gt={"textures/brick": True, "textures/wood": False})
    shards = [_shard(category, i) for category in ("brick", "wood") for i in range(SHARDS_PER_CATEGORY)]
    return job, shards


def _expected(states: list[GroupedAccumulator], pixel_gt: bool):
    merged = states[0]
    for state in states[1:]:
        merged = merged.merge(state)
    return category_metrics(merged, pixel_gt)


def test_each_category_finishes_when_its_last_shard_is_committed(job_and_shards, monkeypatch):
    job, shards = job_and_shards
    store = ShardStore(job.job_url)
    started, release = [], threading.Event()

    def recorded(job, name, shards):
        started.append(name)
        release.wait(60)
        return finish_category(job, name, shards)

    monkeypatch.setattr(category_results, "finish_category", recorded)
    states = {}
    with CategoryFinisher([(job, shards)], committed={}) as finisher:
        for i, shard in enumerate(shards):
            states[shard.shard_id] = _commit(store, shard, seed=i)
            finisher.shard_committed(job.job_id, shard.dataset, shard.category, shard.shard_id)
            finisher.shard_committed(job.job_id, shard.dataset, shard.category, shard.shard_id)  # twice: once
            if shard.category == "brick" and i < SHARDS_PER_CATEGORY - 1:
                assert finisher.started == set()
        assert finisher.started == {"textures/brick", "textures/wood"}
        release.set()
        finisher.finish_remaining()
        results = finisher.collect(job)
    assert sorted(started) == ["textures/brick", "textures/wood"]
    for name, pixel_gt in (("textures/brick", True), ("textures/wood", False)):
        ids = [s.shard_id for s in shards if f"{s.dataset}/{s.category}" == name]
        metrics, per_type = _expected([states[i] for i in ids], pixel_gt)
        assert results[name].metrics == metrics and results[name].per_defect_type == per_type
        assert (results[name].images, results[name].skipped) == (SHARDS_PER_CATEGORY * IMAGES_PER_SHARD, 3)


def test_a_job_asked_for_twice_counts_its_shards_once(job_and_shards):
    job, shards = job_and_shards
    states = _commit_all(job, shards)
    with CategoryFinisher([(job, shards), (job, shards)], committed=_all_committed(job, shards)) as finisher:
        finisher.finish_remaining()
        brick = finisher.collect(job)["textures/brick"]
    assert brick.metrics == _expected(states[:SHARDS_PER_CATEGORY], True)[0]
    assert brick.images == SHARDS_PER_CATEGORY * IMAGES_PER_SHARD


def test_shards_of_an_earlier_run_count_from_the_start(job_and_shards):
    job, shards = job_and_shards
    _commit_all(job, shards)
    wood_last = [s for s in shards if s.category == "wood"][-1]
    done = {s.shard_id for s in shards} - {wood_last.shard_id}
    with CategoryFinisher([(job, shards)], committed={job.job_id: done}) as finisher:
        assert finisher.started == {"textures/brick"}  # every shard resumed: started at once
        finisher.shard_committed(job.job_id, "textures", "wood", wood_last.shard_id)
        finisher.finish_remaining()
        assert set(finisher.collect(job)) == {"textures/brick", "textures/wood"}


def test_a_set_normalised_category_is_finished_after_its_reduce(job_and_shards):
    job, shards = job_and_shards
    store = ShardStore(job.job_url)
    _commit_all(job, shards, extra={"normaliser": {"kind": "set"}})
    with CategoryFinisher([(job, shards)], committed=_all_committed(job, shards)) as finisher:
        storage.atomic_write_json(store.reduced_url("textures", "brick"), {"shards": SHARDS_PER_CATEGORY})
        finisher.finish_remaining()  # brick reduced; wood never was
        with pytest.raises(RuntimeError, match="textures/wood has no reduced metric state"):
            finisher.collect(job)
        storage.atomic_write_json(store.reduced_url("textures", "wood"), {"shards": SHARDS_PER_CATEGORY})
        finisher.finish_remaining()
        assert set(finisher.collect(job)) == {"textures/brick", "textures/wood"}


def test_a_failure_while_finishing_is_raised_by_collect(job_and_shards):
    job, shards = job_and_shards
    _commit_all(job, shards)
    broken = storage.join(job.job_url, "states", f"{shards[1].shard_id}.pkl")
    storage.atomic_write_bytes(broken, b"not a pickle")
    with CategoryFinisher([(job, shards)], committed=_all_committed(job, shards)) as finisher:
        finisher.finish_remaining()
        with pytest.raises(pickle.UnpicklingError):
            finisher.collect(job)
