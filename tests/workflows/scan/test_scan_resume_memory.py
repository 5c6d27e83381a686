"""`residual-ad scan` as a subprocess: kill the driver mid-run and rerun (no image lost or counted twice,
same results as an uninterrupted scan); the driver's peak memory does not grow with the archive size."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

pytest.importorskip("ray")
# four driver subprocesses, each starting its own local Ray: a few minutes on a busy 2-core machine
pytestmark = pytest.mark.slow

from tests.workflows.scan.archive import overlay_files, write_archive, write_normals  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.pipelines.scan_outputs import ScanStore  # noqa: E402

SETTINGS = ["backbone.image_size=64", "device=cpu", "evaluate.batch_size=32"]
LARGE, SMALL = 300, 20  # images per category: 15x apart, both many times a batch


def _command(root, archive: str, output: str) -> list[str]:
    sets = [f"--set={item}" for item in SETTINGS]
    return [sys.executable, "-m", "workflows.cli", "scan", str(root / archive), "--references",
            str(root / "references"), "--output", str(root / output), "--threshold", "1.0",
            "--shard-size", "32", "--max-pixels", "200000", *sets]


def _env(root) -> dict:
    return dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}")


def _run(root, archive, output, *, tracking=False) -> subprocess.CompletedProcess:
    command = _command(root, archive, output)
    if not tracking:
        command.append("--set=tracking.enabled=false")
    done = subprocess.run(command, cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the driver and everything it started (its local Ray included)."""
    members = [p for p in psutil.process_iter(["pid"]) if _session(p) == process.pid]
    for member in members:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


def _session(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except OSError:
        return None


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan-sub")
    write_archive(str(root / "large"), per_category=LARGE, seed=5, bad=True)
    write_archive(str(root / "small"), per_category=SMALL, seed=6, bad=True)
    write_normals(str(root / "references"), 4, seed=1)
    return root


def _results(root, output) -> dict[str, tuple]:
    rows = ScanStore(str(root / output)).read_table("results").to_pylist()
    sources = [r["source"] for r in rows]
    assert len(sources) == len(set(sources))
    return {r["source"]: (r["score"], r["flag"], r["bbox_x0"], r["bbox_y1"]) for r in rows}


@pytest.mark.timeout(1200)
def test_kill_and_resume_gives_the_uninterrupted_results(root):
    output = root / "resumed"
    log = open(root / "killed.log", "w")  # noqa: SIM115 - the driver writes to it until killed
    command = [*_command(root, "large", "resumed"), "--set=tracking.enabled=false"]
    process = subprocess.Popen(command, cwd=root, env=_env(root), stdout=log, stderr=log,
                               start_new_session=True)
    deadline = time.monotonic() + 500
    while len(ScanStore(str(output)).done_ids()) < 3:
        assert process.poll() is None, (root / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the scan committed no shards in time"
        time.sleep(0.5)
    _kill_group(process)
    log.close()
    first = ScanStore(str(output)).markers()
    assert not storage.is_committed(str(output))  # it was stopped mid-run
    total_shards = len(storage.read_bytes(str(output / "plan" / "index.jsonl")).decode().splitlines())
    assert len(first) < total_shards

    resumed = _run(root, "large", "resumed", tracking=True)
    assert "img/s" in resumed.stderr  # progress display: images per second and an ETA
    summary = storage.read_json(str(output / "summary.json"))
    # counting: every shard was committed by exactly one of the two runs, every image seen once
    (first_run,) = {m["run_id"] for m in first}
    assert set(summary["by_run"]) == {first_run, summary["run_id"]}
    assert summary["by_run"][first_run]["shards"] == len(first)
    assert summary["by_run"][summary["run_id"]]["shards"] == total_shards - len(first)
    assert summary["this_run"]["shards_resumed"] == len(first)
    assert summary["this_run"]["images_this_run"] == summary["seen"] - sum(m["seen"] for m in first)
    assert summary["seen"] == summary["planned_images"] == summary["scored"] + summary["skipped"]
    assert summary["scored"] == 2 * LARGE

    # overlays: one file per flagged image, whichever run committed its shard, none twice or missing
    store = ScanStore(str(output))
    overlays = overlay_files(store)
    maps = store.read_table("maps").to_pylist()
    assert overlays == {m["overlay"] for m in maps} and len(maps) == summary["flagged"] > 0

    _run(root, "large", "uninterrupted")
    assert overlay_files(ScanStore(str(root / "uninterrupted"))) == overlays  # the same names
    expected, got = _results(root, "uninterrupted"), _results(root, "resumed")
    assert got.keys() == expected.keys() and len(got) == 2 * LARGE
    for source, (score, flag, x0, y1) in expected.items():
        assert got[source][0] == pytest.approx(score, rel=1e-5, abs=1e-6)
        assert got[source][1:] == (flag, x0, y1)

    import mlflow  # the resumed run was tracked: one MLflow run with the counts

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["residual-ad"], output_format="list")
    (run,) = [r for r in runs if r.data.tags.get("kind") == "scan"]
    assert run.data.metrics["seen"] == summary["seen"] and run.data.metrics["flagged"] == summary["flagged"]


@pytest.mark.timeout(900)
def test_driver_peak_memory_does_not_grow_with_the_archive(root):
    if not storage.is_committed(str(root / "uninterrupted")):
        _run(root, "large", "uninterrupted")
    _run(root, "small", "small-out")
    large = storage.read_json(str(root / "uninterrupted" / "summary.json"))
    small = storage.read_json(str(root / "small-out" / "summary.json"))
    print("driver peak RSS MiB:", small["seen"], small["driver_peak_rss_mb"], large["seen"],
          large["driver_peak_rss_mb"])
    assert large["seen"] > 10 * small["seen"]
    # flat: a 15x larger archive may not add more than a few MiB to the driver's peak RSS
    assert large["driver_peak_rss_mb"] - small["driver_peak_rss_mb"] < 40, (large["driver_peak_rss_mb"],
                                                                           small["driver_peak_rss_mb"])
