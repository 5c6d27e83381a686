"""Shared by the fault tests: tiny configs, result comparison, and finding this test's own Ray actors."""

from __future__ import annotations

import glob
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest

BASE = ["backbone.image_size=64", "index.shots=[1]", "index.seeds=[0]", "tracking.enabled=false"]


def overrides(data: str, output: str, *extra: str) -> list[str]:
    return [*BASE, f"data.url={data}", f"output={output}", *extra]


def config(data: str, output: str, *extra: str):
    from workflows.config import load_config

    return load_config(None, overrides(data, output, *extra))


def cli_args(data: str, output: str, *extra: str) -> list[str]:
    return [f"--set={item}" for item in overrides(data, output, *extra)]


def result_rows(job_url: str) -> list[dict]:
    from workflows.pipelines.commits import ShardStore

    return ShardStore(job_url).read_results().to_pylist()


def assert_same_results(first: list[dict], second: list[dict]) -> None:
    """Same images once each, same status and scores (numerical tolerance)."""
    ids = [r["image_id"] for r in first]
    assert len(ids) == len(set(ids)), "an image was scored twice"
    assert ids == [r["image_id"] for r in second], "images missing or extra"
    assert [r["status"] for r in first] == [r["status"] for r in second]
    np.testing.assert_allclose([r["image_score"] or 0.0 for r in first],
                               [r["image_score"] or 0.0 for r in second], rtol=1e-5, atol=1e-6)


def assert_same_metrics(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, metrics in first.items():
        for metric, value in metrics.items():
            if isinstance(value, float):
                assert value == pytest.approx(second[name][metric], abs=1e-4), (name, metric, value,
                                                                                 second[name][metric])


def own_raylet_pid() -> int:
    """The raylet of the Ray this process started (never another engineer's)."""
    import ray

    node = ray._private.worker._global_node
    return node.all_processes["raylet"][0].process.pid


def own_actor_pids(marker: str = "MapWorker") -> list[int]:
    import psutil

    found = []
    for child in psutil.Process(own_raylet_pid()).children(recursive=True):
        try:
            title = " ".join(child.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if title.startswith("ray::") and marker in title:
            found.append(child.pid)
    return found


def first_file(pattern: str) -> bool:
    return bool(glob.glob(pattern, recursive=True))


def when(condition: Callable[[], bool], action: Callable[[], object], timeout_s: float = 600) -> dict:
    """Run `action` once, on a thread, as soon as `condition()` holds; the dict records what it returned."""
    outcome: dict = {}

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not outcome.get("stop"):
            try:
                if condition():
                    outcome["result"] = action()
                    return
            except Exception as exc:  # noqa: BLE001 - reported to the test
                outcome["error"] = repr(exc)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    outcome["thread"] = thread
    return outcome


def kill_process_group(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
