"""`init_ray` starting a local Ray: the raylet keeps idle workers beyond one per CPU (so the task workers
that imported the pipeline survive the actors' start; `ray_runtime.IDLE_WORKERS_BEYOND_CPUS`), unless the
user set Ray's own soft limit; in a fresh process, since a local Ray's settings are fixed at its start."""

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
