"""The local stack CLI: `up` starts S3 + MLflow (artifacts on that S3) + a Ray head and prints the env to
export; clients work with exactly that env; `down` stops everything and leaves no process behind."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def _stack(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.local.stack", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _exports(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line.startswith("export "):
            key, value = line.removeprefix("export ").split("=", 1)
            out[key] = shlex.split(value)[0]
    return out


def _ours(marker: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(marker in part for part in proc.info["cmdline"] or []):
                found.append(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_stack_up_use_and_down_leaves_nothing(tmp_path):
    state_dir = tmp_path / "stack"
    up = _stack("up", "--state-dir", str(state_dir), "--ray-cpus", "1")
    try:
        assert up.returncode == 0, up.stderr[-3000:]
        env = _exports(up.stdout)
        assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI",
                "RAY_ADDRESS"} <= set(env)
        assert all("127.0.0.1" in env[k] for k in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI", "RAY_ADDRESS"))
        assert _stack("env", "--state-dir", str(state_dir)).stdout.strip() == up.stdout.strip()
        urllib.request.urlopen(f"{env['MLFLOW_TRACKING_URI']}/health", timeout=5).close()

        client_env = {**os.environ, **env}
        client = subprocess.run([sys.executable, "-c", _CLIENT], cwd=ROOT, capture_output=True, text=True,
                                timeout=240, env=client_env)
        assert client.returncode == 0, client.stderr[-3000:]
        report = json.loads(client.stdout.strip().splitlines()[-1])
        assert report["ray_cpus"] == 1.0 and report["task"] == 42
        assert any(key.startswith("mlflow/") and key.endswith("/hello.txt") for key in report["s3_keys"])
        state = json.loads((state_dir / "stack.json").read_text())
        pids = [pid for entry in state["services"].values() for pid in entry["pids"]]
    finally:
        down = _stack("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    from infra.local.services import alive

    assert alive(pids) == []
    assert _ours(str(state_dir)) == []
    assert not (state_dir / "stack.json").exists()


_CLIENT = """
import json, os
import boto3, mlflow, ray
mlflow.set_experiment("stack-test")
with mlflow.start_run():
    mlflow.log_text("hi", "hello.txt")
s3 = boto3.client("s3")
keys = [o["Key"] for o in s3.list_objects_v2(Bucket="residual-ad").get("Contents", [])]
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
task = ray.get(ray.remote(lambda: 41 + 1).remote())
print(json.dumps({"s3_keys": keys, "ray_cpus": ray.cluster_resources().get("CPU"), "task": task}))
ray.shutdown()
"""


def test_run_starts_the_stack_for_one_command_and_stops_it(tmp_path):
    state_dir = tmp_path / "run"
    code = "import os; print(os.environ['AWS_ENDPOINT_URL'], os.environ['MLFLOW_TRACKING_URI'])"
    done = _stack("run", "--state-dir", str(state_dir), "--no-ray", "--", sys.executable, "-c", code)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("http://127.0.0.1:") == 2
    assert _ours(str(state_dir)) == []
