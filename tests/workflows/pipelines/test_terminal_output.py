"""What a user sees on the terminal from `residual-ad evaluate` with a local Ray: our progress and
results, not Ray's notices (token authentication it turned on, progress bars we turned off on purpose,
Ray Data's per-dataset INFO lines -- those stay in the session's ray-data.log)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("ray")

from tests.workflows.pipelines.tiny_data import EVAL_BASE, write_tiny  # noqa: E402

NOT_ON_THE_TERMINAL = (
    "Token authentication is enabled",
    "Progress bars disabled",
    "INFO streaming_executor",
)


def test_evaluate_terminal_has_no_ray_notices(tmp_path):
    data = write_tiny(str(tmp_path / "data"))
    sets = [f"--set={item}" for item in [*EVAL_BASE, "data.datasets=[textures]", f"data.url={data}",
                                         f"output={tmp_path / 'out'}"]]
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = root
    done = subprocess.run([sys.executable, "-m", "workflows.cli", "evaluate", *sets], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "baseline k=1 seed=0" in done.stdout
    terminal = done.stdout + done.stderr
    for notice in NOT_ON_THE_TERMINAL:
        assert notice not in terminal, notice


@pytest.mark.parametrize("num_gpus", [1.0, 0.5])
def test_gpu_actors_reserve_their_cpu_without_ray_datas_experimental_notice(num_gpus):
    """Ray Data logs that naming both CPUs and GPUs for a map "is experimental" on every GPU run; a GPU
    actor names only its GPUs, and Ray Data's own defaults give it the CPU share evaluate and scan plan."""
    import logging

    from ray.data._internal.execution.operators import map_operator

    from workflows.pipelines.ray_runtime import GPU_ACTOR_CPUS
    from workflows.pipelines.scoring import actor_resources

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records = Records()
    map_operator.logger.addHandler(records)  # Ray's loggers do not propagate to pytest's
    try:
        map_operator._canonicalize_ray_remote_args({"num_cpus": GPU_ACTOR_CPUS, "num_gpus": num_gpus})
        assert any("experimental" in m for m in records.messages)  # what naming both prints
        records.messages.clear()
        on_gpu = map_operator._canonicalize_ray_remote_args(actor_resources(num_gpus, GPU_ACTOR_CPUS))
        on_cpu = map_operator._canonicalize_ray_remote_args(actor_resources(0, 0.75))
    finally:
        map_operator.logger.removeHandler(records)
    assert on_gpu == {"num_gpus": num_gpus, "num_cpus": GPU_ACTOR_CPUS}
    assert on_cpu == {"num_cpus": 0.75}
    assert records.messages == []
