"""Kill the driver (SIGKILL, with its local Ray) in the middle of `lodo` and of `scan`: a rerun resumes
from the committed shards and its results equal an uninterrupted run's, nothing scored twice or missing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import (  # noqa: E402
    BASE,
    assert_same_metrics,
    assert_same_results,
    cli_args,
    config,
    first_file,
    result_rows,
)
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from tests.workflows.scan.archive import write_archive, write_normals  # noqa: E402

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
LODO = ("lodo.methods=[{name: baseline}]", "evaluate.shard_size=1", "data.datasets=[textures,labels]")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def _kill_driver_when(argv: list[str], pattern: str, log: Path, timeout_s: float = 600) -> int:
    """Start the CLI as its own process group; SIGKILL the group (driver + its Ray) once `pattern`
    matches a file. Returns how many processes were killed; fails if the driver ended by itself."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    with open(log, "wb") as handle:
        driver = subprocess.Popen([sys.executable, "-m", "workflows.cli", *argv], cwd=ROOT, env=env,
                                  stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while driver.poll() is None and time.monotonic() < deadline and not first_file(pattern):
        time.sleep(0.05)
    if driver.poll() is not None:
        pytest.fail(f"the driver ended (code {driver.returncode}) before it could be killed:\n"
                    f"{log.read_text(errors='replace')[-3000:]}")
    tree = [driver.pid, *(c.pid for c in psutil.Process(driver.pid).children(recursive=True))]
    os.killpg(driver.pid, 9)
    for pid in tree:  # Ray daemons that left the group are still ours: end them by id
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    driver.wait(timeout=30)
    return len(tree)


def test_kill_driver_mid_lodo_then_rerun_resumes(local_ray, tmp_path):
    from workflows.pipelines.lodo import run_lodo

    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=4, n_anomalous=4)
    output = tmp_path / "killed"
    argv = ["lodo", *cli_args(data, str(output), *LODO)]
    killed = _kill_driver_when(argv, f"{output}/evaluate/*/done/*.json", tmp_path / "driver.log")
    assert killed, "lodo finished before the driver could be killed"
    done_before = len(list(output.glob("evaluate/*/done/*.json")))
    assert done_before >= 1

    resumed = run_lodo(config(data, str(output), *LODO), progress=False)
    reference = run_lodo(config(data, str(tmp_path / "reference"), *LODO), progress=False)
    assert sum(e.resumed_shards for e in resumed.evaluations) >= 1
    by_label = {e.spec.label(): e for e in reference.evaluations}
    assert len(resumed.evaluations) == len(by_label) == 2
    for evaluation in resumed.evaluations:
        other = by_label[evaluation.spec.label()]
        assert evaluation.counts == other.counts
        assert_same_results(result_rows(evaluation.job_url), result_rows(other.job_url))
        assert_same_metrics(evaluation.per_category, other.per_category)
    assert resumed.markdown == reference.markdown


def _scan_rows(url: str) -> list[dict]:
    from workflows.pipelines.scan_outputs import ScanStore

    table = ScanStore(url).read_table("results")
    return sorted(table.to_pylist(), key=lambda r: r["image_id"])


def test_kill_driver_mid_scan_then_rerun_resumes(local_ray, tmp_path):
    from workflows.config import load_config
    from workflows.pipelines.scan import ScanOptions, run_scan

    archive = write_archive(str(tmp_path / "archive"), per_category=40, bad=False, no_reference_images=0)
    write_normals(str(tmp_path / "references"), 2, seed=1)
    output = tmp_path / "killed"
    argv = ["scan", str(tmp_path / "archive"), "--references", str(tmp_path / "references"),
            "--threshold", "1.0", "--output", str(output), "--shard-size", "4", "--quiet",
            *[f"--set={item}" for item in [*BASE, "device=cpu"]]]
    killed = _kill_driver_when(argv, f"{output}/done/*.json", tmp_path / "driver.log")
    assert killed, "scan finished before the driver could be killed"
    assert not (output / "_SUCCESS").exists()

    scan_config = load_config(None, [*BASE, "device=cpu"])

    def options(out: Path) -> ScanOptions:
        return ScanOptions(input=str(tmp_path / "archive"), output=str(out),
                           references=str(tmp_path / "references"), threshold=1.0, shard_size=4)

    summary = run_scan(scan_config, options(output), progress=False)
    reference = run_scan(scan_config, options(tmp_path / "reference"), progress=False)
    assert summary["seen"] == reference["seen"] == len(archive.images) == summary["scored"]
    assert summary["this_run"]["images_this_run"] < len(archive.images)  # it resumed, not restarted
    first, second = _scan_rows(str(output)), _scan_rows(str(tmp_path / "reference"))
    ids = [r["image_id"] for r in first]
    assert len(ids) == len(set(ids)) == len(archive.images)  # nothing twice, nothing missing
    assert ids == [r["image_id"] for r in second]
    assert [round(r["score"], 4) for r in first] == [round(r["score"], 4) for r in second]
    assert [r["flag"] for r in first] == [r["flag"] for r in second]
