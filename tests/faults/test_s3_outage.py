"""The S3 server goes away for a few seconds and comes back (a TCP proxy in front of moto is taken down):
bounded retries carry the work through, or it fails with a clear error naming the object; a rerun
resumes and gives the same results as an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import assert_same_results, cli_args, config, result_rows  # noqa: E402
from tests.faults.outage_proxy import OutageProxy  # noqa: E402
from tests.fixtures.s3 import FAKE_SECRET  # noqa: E402
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows import storage  # noqa: E402

pytestmark = pytest.mark.timeout(900)
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ("data.datasets=[textures]", "evaluate.shard_size=1")


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """Point this process's S3 client at a proxy of the S3 server."""
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    outage = OutageProxy(port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", outage.endpoint_url)
    storage.clear_cache()
    yield outage
    outage.down()
    monkeypatch.undo()
    storage.clear_cache()


def _outage_for(proxy: OutageProxy, seconds: float) -> threading.Thread:
    def run() -> None:
        proxy.down()
        time.sleep(seconds)
        proxy.up()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_short_outage_is_carried_by_bounded_retries(s3_server, proxy):
    url = s3_server.unique_url("outage") + "/object.bin"
    storage.atomic_write_bytes(url, b"payload")
    outage = _outage_for(proxy, 1.0)
    time.sleep(0.1)
    assert storage.read_bytes(url) == b"payload"  # retried across the outage
    outage.join()


def test_long_outage_fails_clearly_naming_the_object(s3_server, proxy):
    url = s3_server.unique_url("outage") + "/object.bin"
    storage.atomic_write_bytes(url, b"payload")
    proxy.down()
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as caught:
        storage.read_bytes(url)
    assert time.monotonic() - started < 120  # bounded, not forever
    assert url in str(caught.value) and FAKE_SECRET not in str(caught.value)
    proxy.up()
    assert storage.read_bytes(url) == b"payload"


def _a_shard_done(output: str) -> bool:
    markers = [u for u in storage.list_urls(output, recursive=True) if "/done/" in u] \
        if storage.exists(output) else []
    return bool(markers)


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_server
    ray.shutdown()


def test_outage_mid_evaluate_then_rerun_resumes(s3_ray, tmp_path):
    from workflows.pipelines.evaluate import run_evaluate

    data = write_tiny(s3_ray.unique_url("data"), n_train=2, n_normal=4, n_anomalous=4)
    output = s3_ray.unique_url("out")
    port = int(s3_ray.endpoint_url.rsplit(":", 1)[1])
    proxy = OutageProxy(port)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint_url, "RAY_ADDRESS": ""}
    log = tmp_path / "driver.log"
    with open(log, "wb") as handle:
        driver = subprocess.Popen([sys.executable, "-m", "workflows.cli", "evaluate",
                                   *cli_args(data, output, *SETTINGS)], cwd=ROOT, env=env, stdout=handle,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while driver.poll() is None and time.monotonic() < deadline and not _a_shard_done(output):
            time.sleep(0.2)
        outage = _outage_for(proxy, 4.0)  # mid-run: shards are being read and committed
        outage.join()
        driver.wait(timeout=600)
    finally:
        if driver.poll() is None:
            driver.kill()
        proxy.down()
    printed = log.read_text(errors="replace")
    assert FAKE_SECRET not in printed
    if driver.returncode != 0:  # not carried through: the error must name what it was doing
        assert "s3://" in printed, printed[-3000:]
    (rerun,) = run_evaluate(config(data, output, *SETTINGS), progress=False)  # resumes (or reuses)
    (reference,) = run_evaluate(config(data, s3_ray.unique_url("reference"), *SETTINGS), progress=False)
    assert rerun.completed and rerun.counts == reference.counts
    assert_same_results(result_rows(rerun.job_url), result_rows(reference.job_url))
