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
