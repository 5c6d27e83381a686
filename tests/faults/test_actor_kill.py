"""SIGKILL a scoring actor in the middle of `evaluate`: Ray restarts it and retries its work (bounded),
the run completes, and its results equal an uninterrupted run's. Killed more often than
`evaluate.max_retries` allows, the command fails with one clear line (not a hang), and a rerun completes
with the same results."""

from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import (  # noqa: E402
    assert_same_metrics,
    assert_same_results,
    cli_args,
    config,
    first_file,
    own_actor_pids,
    result_rows,
    when,
)
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows.pipelines.evaluate import run_evaluate  # noqa: E402

pytestmark = pytest.mark.timeout(600)
SETTINGS = ("data.datasets=[textures]", "evaluate.shard_size=1", "evaluate.max_retries=3")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def test_sigkill_scoring_actor_mid_evaluate(local_ray, tmp_path):
    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=5, n_anomalous=5)
    (reference,) = run_evaluate(config(data, str(tmp_path / "reference"), *SETTINGS), progress=False)

    output = tmp_path / "killed"

    def kill_one_actor():
        pids = own_actor_pids()
        for pid in pids[:1]:
            os.kill(pid, signal.SIGKILL)
        return pids[:1]

    # as soon as the first shard is committed, an actor is mid-run: kill it
    killer = when(lambda: first_file(f"{output}/evaluate/*/done/*.json") and own_actor_pids(), kill_one_actor)
    (result,) = run_evaluate(config(data, str(output), *SETTINGS), progress=False)
    killer["stop"] = True
    killer["thread"].join(timeout=5)
    assert "error" not in killer, killer.get("error")
    assert killer.get("result"), "the run finished before an actor could be killed"
    assert result.completed and result.counts == reference.counts
    assert_same_results(result_rows(result.job_url), result_rows(reference.job_url))
    assert_same_metrics(result.per_category, reference.per_category)


def test_actor_killed_more_often_than_max_restarts_fails_clearly_then_rerun_completes(local_ray, tmp_path,
                                                                                     capfd):
    import glob
    import re

    from workflows.cli import main

    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=5, n_anomalous=5)
    output = tmp_path / "killed"
    # one actor, one restart allowed: the second kill is fatal (with several actors the kills could each
    # land on another one, each within its own restart budget)
    limited = (*SETTINGS[:2], "evaluate.max_retries=1", "evaluate.num_actors=1")
    killed: list[int] = []

    def committed() -> int:
        return len(glob.glob(f"{output}/evaluate/*/done/*.json"))

    state = {"last": 0}

    def working_actor_appeared() -> bool:
        # kill each incarnation once it has committed a shard (so it is running, not starting up)
        return committed() > state["last"] and bool(own_actor_pids())

    def kill_it():
        (pid, *_) = own_actor_pids()
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        state["last"] = committed()
        if len(killed) < 2:
            nonlocal killer
            killer = when(working_actor_appeared, kill_it)
        return pid

    killer = when(working_actor_appeared, kill_it)
    capfd.readouterr()
    code = main(["evaluate", *cli_args(str(data), str(output), *limited)])
    killer["stop"] = True
    assert "error" not in killer, killer.get("error")
    err = capfd.readouterr().err
    assert len(killed) == 2, f"killed {killed}; the run ended first:\n{err[-3000:]}"
    assert code == 1, err[-3000:]
    last = [line.strip() for line in re.split(r"[\r\n]+", err) if line.strip()][-1]
    assert last.startswith("residual-ad evaluate: error: ActorDiedError: "), err[-3000:]
    assert "evaluate.max_retries" in last and "rerun" in last

    (rerun,) = run_evaluate(config(data, str(output), *SETTINGS), progress=False)
    (reference,) = run_evaluate(config(data, str(tmp_path / "reference"), *SETTINGS), progress=False)
    assert rerun.completed and rerun.resumed_shards >= 2 and rerun.counts == reference.counts
    assert_same_results(result_rows(rerun.job_url), result_rows(reference.job_url))
    assert_same_metrics(rerun.per_category, reference.per_category)
