"""SIGKILL a scoring actor in the middle of `evaluate`: Ray restarts it and retries its work (bounded),
the run completes, and its results equal an uninterrupted run's."""

from __future__ import annotations

import os
import signal

import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import (  # noqa: E402
    assert_same_metrics,
    assert_same_results,
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
