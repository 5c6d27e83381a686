"""The pipelines' Ray and device settings. `init_ray` starting a local Ray: the raylet keeps idle workers
beyond one per CPU (so the task workers that imported the pipeline survive the actors' start;
`ray_runtime.IDLE_WORKERS_BEYOND_CPUS`), unless the user set Ray's own soft limit; in a fresh process,
since a local Ray's settings are fixed at its start. Bank tasks reuse their worker; a GPU computes in full
float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workflows.pipelines.ray_runtime import IDLE_WORKERS_BEYOND_CPUS, SOFT_LIMIT_ENV

PROBE = """
import json, ray
from workflows.pipelines.ray_runtime import init_ray
init_ray(num_cpus=2)
# the settings the local node was started with (no public API reads them back)
print("CONFIG", json.dumps(ray._private.worker._global_node._ray_params._system_config or {}))
ray.shutdown()
"""


def _started_config(env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300,
                         check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("CONFIG "))
    return json.loads(line.removeprefix("CONFIG "))


@pytest.mark.parametrize("user_limit", [None, "3"])
def test_a_local_ray_keeps_idle_workers_unless_the_user_says(user_limit):
    env = {k: v for k, v in os.environ.items() if k not in (SOFT_LIMIT_ENV, "RAY_ADDRESS")}
    if user_limit is not None:
        env[SOFT_LIMIT_ENV] = user_limit
    config = _started_config(env)
    expected = None if user_limit else 2 + IDLE_WORKERS_BEYOND_CPUS
    assert config.get("num_workers_soft_limit") == expected


def test_bank_tasks_reuse_their_worker_when_they_ask_for_a_gpu():
    """Ray gives a task asking for GPUs a new worker process per call unless `max_calls` says otherwise
    (a new process, CUDA context and model per bank); the bank tasks' options say otherwise."""
    import ray

    from workflows.pipelines.index import bank_task_options, build_bank_task

    remote = ray.remote(**bank_task_options(gpus=1.0, max_retries=2))(build_bank_task)
    assert remote._default_options["max_calls"] == 0  # 0: no limit
    assert ray.remote(num_gpus=1.0)(build_bank_task)._default_options["max_calls"] == 1  # Ray's default


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_gpu_device_computes_in_full_float32(device):
    """PyTorch lets cuDNN use TF32 for float32 convolutions on Ampere and newer GPUs; the pipelines turn
    that off wherever they resolve a CUDA device, so GPU and CPU runs give the same figures."""
    import torch

    from workflows.pipelines.ray_runtime import resolve_device

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert resolve_device("cpu") == "cpu" and torch.backends.cudnn.allow_tf32
        assert resolve_device(device) == device
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize(("gpus", "settings", "expected"), [
    (0.0, (None, None, 2), (5, 0.0, "cpu share")),  # no GPUs: `default_cpu_actors` (5 here)
    (0.0, (3, None, 2), (3, 0.0, "cpu share")),
    (0.0, (None, None, 2, 2), (2, 0.0, "cpu share")),  # a default count: at most one actor per shard
    (0.0, (3, None, 2, 1), (3, 0.0, "cpu share")),  # a count the user gave: as given
    (1.0, (None, None, 2, 1), (1, 0.5, 1.0)),
    (1.0, (None, None, 2), (2, 0.5, 1.0)),  # by default two actors share each GPU
    (8.0, (None, None, 2), (16, 0.5, 1.0)),
    (1.0, (None, None, 3), (3, 1 / 3, 1.0)),  # three thirds fit one GPU despite the rounding
    (2.0, (None, 1.0, 2), (2, 1.0, 1.0)),  # a GPU share given: as many actors as shares
    (2.0, (5, 0.25, 2), (5, 0.25, 1.0)),  # both given: as given
    (4.0, (None, 0.0, 2), (5, 0.0, "cpu share")),  # CPU actors asked for on a GPU cluster
])
def test_scoring_actors_fill_the_cluster_unless_told(monkeypatch, gpus, settings, expected):
    from workflows.pipelines import ray_runtime

    monkeypatch.setattr(ray_runtime, "cluster_gpus", lambda: gpus)
    monkeypatch.setattr(ray_runtime, "actor_cpus", lambda num_actors: "cpu share")
    monkeypatch.setattr(ray_runtime, "default_cpu_actors", lambda: 5)
    plan = ray_runtime.scoring_actors(*settings)
    assert (plan.actors, plan.gpus, plan.cpus) == expected


GIB = 1 << 30


@pytest.mark.parametrize(("resources", "expected"), [
    ({"CPU": 2.0, "memory": 16 * GIB}, 2),  # the 2-core machine: two 1-thread actors
    ({"CPU": 1.0, "memory": 16 * GIB}, 1),
    ({"CPU": 4.0, "memory": 16 * GIB}, 4),
    ({"CPU": 8.0, "memory": 64 * GIB}, 7),  # 7/8 of the CPUs score, the rest decodes
    ({"CPU": 16.0, "memory": 64 * GIB}, 14),
    ({"CPU": 16.0, "memory": 9 * GIB}, 4),  # no more actors than the memory holds (2 GiB each)
    ({"CPU": 16.0, "memory": 1 * GIB}, 1),  # at least one
    ({"CPU": 2.0}, 2),  # memory not reported: by CPUs
])
def test_default_cpu_actors_take_most_cpus_within_memory(monkeypatch, resources, expected):
    from workflows.pipelines import ray_runtime

    monkeypatch.setattr(ray_runtime.ray, "cluster_resources", lambda: resources)
    assert ray_runtime.default_cpu_actors() == expected
    assert ray_runtime.CPU_ACTOR_MEMORY == 2 * GIB
