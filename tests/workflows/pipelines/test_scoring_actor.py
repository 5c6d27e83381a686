"""The scoring actor's inputs and loop, in process (the stages are plain callables; Ray only where
`run_scoring` is under test):

- a shard prepared as uint8 pixels scores exactly as the same shard prepared as normalised float32
  (per-image and per-branch scores, metric states, maps; ResAD++'s raw outputs), including a corrupt
  row counted as skipped and a shard with nothing kept;
- a failure in the background reduction (`background.SerialWorker`) fails the shard with its error;
- each actor runs torch with as many threads as its CPU share (in process, and through `run_scoring`).
"""

from __future__ import annotations

import json
import tempfile
import threading
from dataclasses import asdict

import numpy as np
import pytest

from tests.workflows.pipelines.tiny_data import EVAL_BASE, write_tiny
from workflows import storage
from workflows.config import load_config
from workflows.datasets.reader import read_table
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.scoring import ScoringActor, ScoringJob, prepare_shard
from workflows.pipelines.shards import plan_shards

DATASET, CATEGORY = "textures", "brick"
BATCH = 3  # crosses the shards of 4
RESADPP = {"name": "resadpp", "params": {"num_embeddings": 16, "coupling_layers": 2, "pos_embed_dim": 16}}
BASELINE = {"name": "baseline", "params": {}}
UNSHARED_THREADS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(root, data URL, backbone config, backbone info) of the tiny data with one corrupt test image."""
    from workflows.pipelines.models import probe_backbone

    root = tmp_path_factory.mktemp("transport")
    data_url = write_tiny(str(root / "data"), corrupt=1)
    config = load_config(None, [*EVAL_BASE, f"data.url={data_url}", f"output={root / 'out'}"])
    backbone = asdict(config.backbone)
    return root, data_url, backbone, probe_backbone(backbone)


def make_job(tiny, method: dict, name: str) -> ScoringJob:
    """A scoring job of `method` on textures/brick with a one-shot bank built here (as the index does)."""
    from residual_core.bank import build_bank, save_bank
    from workflows.pipelines.artifacts import upload_dir
    from workflows.pipelines.index import read_images
    from workflows.pipelines.models import method_preprocess

    root, data_url, backbone, info = tiny
    job = ScoringJob(job_id=name, job_url=str(root / name), backbone=backbone, method=method, banks={},
                     device="cpu", image_size=info.image_size, mean=info.mean, std=info.std,
                     save_maps="all", map_dtype="float32", pixel_gt={f"{DATASET}/{CATEGORY}": True})
    bank_url = str(root / f"bank-{method_preprocess(method)}")
    if not storage.is_committed(bank_url):
        train = read_table(data_url, columns=["image_id"], filters=[
            ("dataset", "==", DATASET), ("category", "==", CATEGORY), ("split", "==", "train")])
        ids = sorted(train.column("image_id").to_pylist())[:1]
        images = read_images(data_url, DATASET, CATEGORY, "train", ids, info, job.preprocess)
        bank = build_bank(ScoringActor()._method(job).backbone, images, dataset=DATASET, category=CATEGORY,
                          seed=0, image_ids=ids)
        with tempfile.TemporaryDirectory() as tmp:
            save_bank(bank, tmp)
            upload_dir(tmp, bank_url)
    job.banks = {f"{DATASET}/{CATEGORY}": bank_url}
    return job


def shards_of(tiny):
    return plan_shards(tiny[1], split="test", shard_size=4, datasets=[DATASET], categories=[CATEGORY])


def task(job: ScoringJob, shard) -> dict:
    return {"job": job.to_json(), "shard": json.dumps(shard.to_dict())}


def score_shards(tiny, method: dict, name: str, *, eight_bit: bool, monkeypatch) -> tuple[ScoringJob, list]:
    """Prepare (uint8 or float32 transport, as the preset is told) and score every shard in process."""
    from residual_core.preprocess import get_preprocess

    job = make_job(tiny, method, name)
    monkeypatch.setattr(type(get_preprocess(job.preprocess)), "EIGHT_BIT_EXACT", eight_bit)
    actor, shards = ScoringActor(batch_size=BATCH), shards_of(tiny)
    for shard in shards:
        row = prepare_shard(task(job, shard))
        assert row["images"].dtype == (np.uint8 if eight_bit else np.float32)
        actor(row)
    monkeypatch.undo()
    return job, shards


@pytest.mark.parametrize("method", [BASELINE, RESADPP], ids=["baseline", "resadpp"])
def test_uint8_transport_scores_exactly_as_float32(tiny, method, monkeypatch):
    runs = {bits: score_shards(tiny, method, f"{method['name']}-{bits}", eight_bit=bits == "u8",
                               monkeypatch=monkeypatch) for bits in ("u8", "f32")}
    (u8_job, shards), (f32_job, _) = runs["u8"], runs["f32"]
    u8, f32 = ShardStore(u8_job.job_url), ShardStore(f32_job.job_url)
    assert u8.done_ids() == f32.done_ids() == {s.shard_id for s in shards} and len(shards) >= 2
    u8_results, f32_results = u8.read_results(), f32.read_results()
    assert u8_results.equals(f32_results)
    statuses = u8_results.column("status").to_pylist()
    assert statuses.count("skipped") == 1 and statuses.count("scored") >= 5  # the corrupt row counted
    for shard in shards:
        assert u8.summary(shard.shard_id) == f32.summary(shard.shard_id)
        if method is BASELINE:
            _assert_same_arrays(u8.read_npz(storage.join(u8_job.job_url, "maps", f"{shard.shard_id}.npz")),
                                f32.read_npz(storage.join(f32_job.job_url, "maps", f"{shard.shard_id}.npz")))
            assert _metrics(u8.state(shard.shard_id)) == _metrics(f32.state(shard.shard_id))
        else:  # set-normalised: the actors commit raw outputs, finished later per category
            _assert_same_arrays(u8.raw(shard.shard_id), f32.raw(shard.shard_id))


def test_a_shard_with_nothing_kept_crosses_as_an_empty_uint8_batch(tiny):
    job = make_job(tiny, BASELINE, "empty")
    shard = shards_of(tiny)[0]
    empty = type(shard)(**{**shard.to_dict(), "stop": shard.start})  # zero rows
    row = prepare_shard(task(job, empty))
    assert row["images"].shape == (0, 3, job.image_size, job.image_size) and row["images"].dtype == np.uint8
    summary = json.loads(ScoringActor(batch_size=BATCH)(row)["summary"])
    assert summary["images"] == 0 and ShardStore(job.job_url).is_done(empty.shard_id)


def test_a_prepared_shard_holds_each_kept_rows_preset_pixels_and_mask(tiny):
    """The decode task writes images and masks straight into the shard's arrays: row i is the preset's
    picture and thresholded mask of kept row i, the corrupt row left out (not a hole, not shifted)."""
    from residual_core.images import decode_image, decode_mask
    from residual_core.preprocess import get_preprocess

    job = make_job(tiny, BASELINE, "prepared-rows")
    preset, size = get_preprocess(job.preprocess), job.image_size
    table = {r["image_id"]: r for r in read_table(tiny[1], filters=[
        ("dataset", "==", DATASET), ("category", "==", CATEGORY), ("split", "==", "test")]).to_pylist()}
    skipped = 0
    for shard in shards_of(tiny):
        row = prepare_shard(task(job, shard))
        rows = json.loads(row["rows"])
        skipped += len(rows["skipped"])
        assert row["images"].shape == (len(rows["kept"]), 3, size, size) and row["images"].flags.owndata
        for i, kept in enumerate(rows["kept"]):
            source = table[kept["image_id"]]
            image = decode_image(source["image"])
            mask = None if source["mask"] is None else decode_mask(source["mask"], image.size)
            assert np.array_equal(row["images"][i], preset.pixels_chw(image, size))
            assert np.array_equal(row["masks"][i], preset.mask(mask, size)[0].numpy().astype(np.uint8))
    assert skipped == 1


def _metrics(state: dict) -> dict:
    from residual_core.metrics import GroupedAccumulator

    return GroupedAccumulator.from_state_dict(state).merged().compute()


def _assert_same_arrays(left: dict, right: dict) -> None:
    assert sorted(left) == sorted(right) and left
    for key, value in left.items():
        np.testing.assert_array_equal(value, right[key], err_msg=key)


def test_a_failure_in_the_background_reduction_fails_the_shard(tiny, monkeypatch):
    """`ShardOutputs.add` raising on the second batch (in the worker thread): the actor call raises that
    error, nothing of the shard is committed, and the next call (a retry) commits it."""
    from workflows.pipelines.shard_outputs import ShardOutputs

    job = make_job(tiny, BASELINE, "failing")
    shard = shards_of(tiny)[0]
    row = prepare_shard(task(job, shard))
    assert len(row["images"]) > BATCH  # two batches: the failure is not in the first one
    real_add, calls = ShardOutputs.add, []

    def failing_add(self, start, out, masks):
        calls.append((start, threading.current_thread() is threading.main_thread()))
        if len(calls) == 2:
            raise RuntimeError("reduction failed on purpose")
        return real_add(self, start, out, masks)

    monkeypatch.setattr(ShardOutputs, "add", failing_add)
    actor = ScoringActor(batch_size=BATCH)
    with pytest.raises(RuntimeError, match="reduction failed on purpose"):
        actor(row)
    assert calls == [(0, False), (BATCH, False)]  # reduced on the background thread
    assert not ShardStore(job.job_url).is_done(shard.shard_id)
    monkeypatch.undo()
    actor(row)
    assert ShardStore(job.job_url).is_done(shard.shard_id)


@pytest.mark.parametrize(("num_cpus", "threads"), [(0.25, 1), (1.0, 1), (2.7, 2)])
def test_an_actor_takes_its_torch_threads_from_its_cpu_share(num_cpus, threads):
    import torch

    before = torch.get_num_threads()
    try:
        ScoringActor(num_cpus=num_cpus)
        assert torch.get_num_threads() == threads
        assert torch.is_grad_enabled()  # scoring turns gradients off where it scores, not process-wide
        torch.set_num_threads(3)
        ScoringActor()  # in-process use (local scoring): threads left alone
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


class _ThreadsActor(ScoringActor):
    """Starts with more torch threads than its share; reports the threads it runs with instead of
    scoring."""

    def __init__(self, **kwargs) -> None:
        import torch

        torch.set_num_threads(UNSHARED_THREADS)
        super().__init__(**kwargs)

    def __call__(self, task: dict) -> dict:
        import torch

        return {"shard": task["shard"], "threads": torch.get_num_threads()}


def test_run_scoring_hands_each_actor_its_cpu_share(local_ray, tiny):
    """1.5 of the 2 local CPUs (the rest for the prepare tasks): one thread."""
    from workflows.pipelines.scoring import run_scoring

    job = ScoringJob(job_id="threads", job_url="", backbone={}, method=BASELINE, banks={})
    rows = list(run_scoring([(job, s) for s in shards_of(tiny)], batch_size=BATCH, num_actors=1,
                            num_gpus_per_actor=0, actor_num_cpus=1.5, prepare_fn=lambda task: task,
                            actor_cls=_ThreadsActor))
    assert len(rows) == len(shards_of(tiny)) and {r["threads"] for r in rows} == {1}


def test_two_calls_at_once_commit_what_one_at_a_time_commits(tiny, monkeypatch):
    """A GPU actor runs two shard calls at once (`CALLS_PER_GPU_ACTOR`): one scores while the other
    commits. The first call's commit waits until the second is scoring (so commits are outside the
    scoring lock), never two shards score at once, and the outputs equal one-at-a-time calls'."""
    serial, both = make_job(tiny, BASELINE, "one-at-a-time"), make_job(tiny, BASELINE, "two-at-once")
    first, second = shards_of(tiny)[:2]
    actor = ScoringActor(batch_size=BATCH)
    for shard in (first, second):
        actor(prepare_shard(task(serial, shard)))

    concurrent = ScoringActor(batch_size=BATCH)
    scoring, most, second_scoring = [], [], threading.Event()
    real_batches, real_commit = concurrent.scored_batches, ShardStore.commit

    def scored_batches(job, shard, *args, **kwargs):  # runs under the scoring lock
        scoring.append(shard.shard_id)
        most.append(len(scoring))
        if shard.shard_id == second.shard_id:
            second_scoring.set()
        try:
            yield from real_batches(job, shard, *args, **kwargs)
        finally:
            scoring.remove(shard.shard_id)

    def commit(store, shard, *args, **kwargs):
        if shard.shard_id == first.shard_id:
            assert second_scoring.wait(timeout=120), "the second shard never scored during the first's commit"
        return real_commit(store, shard, *args, **kwargs)

    monkeypatch.setattr(concurrent, "scored_batches", scored_batches)
    monkeypatch.setattr(ShardStore, "commit", commit)
    rows, errors = [prepare_shard(task(both, shard)) for shard in (first, second)], []
    calls = [threading.Thread(target=_run, args=(concurrent, row, errors)) for row in rows]
    for call in calls:
        call.start()
    for call in calls:
        call.join(timeout=300)
    monkeypatch.undo()
    assert not errors and not any(call.is_alive() for call in calls)
    assert most == [1, 1]  # one shard scored at a time
    left, right = ShardStore(serial.job_url), ShardStore(both.job_url)
    assert left.read_results().sort_by("image_id").equals(right.read_results().sort_by("image_id"))
    for shard in (first, second):
        assert _metrics(left.state(shard.shard_id)) == _metrics(right.state(shard.shard_id))


def _run(actor, row, errors: list) -> None:
    try:
        actor(row)
    except Exception as exc:  # noqa: BLE001 - reported by the test's assertion
        errors.append(exc)


@pytest.mark.parametrize(("gpus", "calls"), [(0, 1), (1, 2), (0.5, 2)])
def test_gpu_actors_run_two_shard_calls_at_once(gpus, calls):
    from workflows.pipelines.scoring import actor_pool, calls_at_once

    assert calls_at_once(gpus) == calls
    pool = actor_pool(2, calls)
    assert (pool.min_size, pool.max_size) == (2, 2)
    assert pool.max_concurrent_calls_per_actor == calls and pool.enable_true_multi_threading == (calls > 1)


class _MeetingActor(ScoringActor):
    """Each call waits (bounded) until another call is running in the same actor at the same time."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.running = threading.Semaphore(0)
        self.lock, self.count = threading.Lock(), 0

    def __call__(self, task: dict) -> dict:
        with self.lock:
            self.count += 1
            if self.count % 2 == 0:  # the second of a pair: release the first and itself
                self.running.release()
                self.running.release()
        met = self.running.acquire(timeout=60)
        return {"shard": task["shard"], "met": met}


def test_run_scoring_runs_two_calls_at_once_in_one_actor(local_ray, tiny):
    """Through Ray Data: one actor running two shard calls at once (as a GPU actor does) has two calls in
    flight together: each call of a pair meets the other (a one-call actor would time out waiting)."""
    from workflows.pipelines.scoring import run_scoring

    job = ScoringJob(job_id="pairs", job_url="", backbone={}, method=BASELINE, banks={})
    shards = shards_of(tiny)[:2]
    rows = list(run_scoring([(job, s) for s in shards], batch_size=BATCH, num_actors=1, num_gpus_per_actor=0,
                            actor_num_cpus=1.0, prepare_fn=lambda task: task, actor_cls=_MeetingActor,
                            calls_per_actor=2))
    assert len(rows) == 2 and all(row["met"] for row in rows)
