"""The S3 server goes away (a TCP proxy in front of moto refuses or black-holes connections) and comes
back: bounded retries carry a short outage through; a permanent one fails within the configured bound
(`RESIDUAL_AD_S3_DEADLINE_S`) with one clear line, never a hang; a rerun resumes and gives the same results
as an uninterrupted run. Every wait is on a condition (the proxy counts the connections that met the
outage), never on a sleep."""

from __future__ import annotations

import os
import re
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
    outage.close()
    monkeypatch.undo()
    storage.clear_cache()


def _in_background(fn) -> tuple[threading.Thread, dict]:
    """Run `fn` on a daemon thread; the dict gets its `result` or its `error`."""
    got: dict = {}

    def run() -> None:
        try:
            got["result"] = fn()
        except Exception as exc:  # noqa: BLE001 - reported by the caller
            got["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, got


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_short_outage_is_carried_by_bounded_retries(s3_server, proxy, monkeypatch, mode):
    monkeypatch.setenv(storage.DEADLINE_ENV, "600")  # the outage ends when the test says, well within
    storage.clear_cache()
    url = s3_server.unique_url("outage") + "/object.bin"
    storage.atomic_write_bytes(url, b"payload")
    proxy.down(mode)
    reader, got = _in_background(lambda: storage.read_bytes(url))
    assert proxy.wait_for_hits(1), "the read never met the outage"
    proxy.up()
    reader.join(timeout=600)
    assert got == {"result": b"payload"}  # retried across the outage


@pytest.mark.parametrize("mode", ["refuse", "blackhole"])
def test_long_outage_fails_within_the_bound_naming_the_object(s3_server, proxy, monkeypatch, mode):
    monkeypatch.setenv(storage.DEADLINE_ENV, "5")
    storage.clear_cache()
    url = s3_server.unique_url("outage") + "/object.bin"
    storage.atomic_write_bytes(url, b"payload")
    proxy.down(mode)
    started = time.monotonic()
    for attempt in (lambda: storage.read_bytes(url), lambda: storage.atomic_write_bytes(url, b"other"),
                    lambda: storage.list_urls(url.rsplit("/", 1)[0])):
        with pytest.raises(storage.StorageError) as caught:
            attempt()
        assert url.rsplit("/", 1)[0] in str(caught.value) and FAKE_SECRET not in str(caught.value)
        assert storage.DEADLINE_ENV in str(caught.value)  # says which bound gave up
    assert time.monotonic() - started < 300  # bounded (3 x 5 s here), never a hang; generous under load
    proxy.up()
    assert storage.read_bytes(url) == b"payload"


def test_a_hung_upload_is_cut_and_retried_long_before_the_deadline(s3_server, proxy, monkeypatch):
    """A PUT that S3 accepts and never answers: aiohttp arms no read timeout before a PUT's body is
    sent (`Expect: 100-continue`), so only the per-attempt bound cuts it; the next attempt lands once
    S3 answers again, instead of the write hanging until the deadline (600 s here)."""
    monkeypatch.setenv(storage.DEADLINE_ENV, "600")
    default_round_trips = storage.ATTEMPT_ROUND_TRIPS
    monkeypatch.setattr(storage, "ATTEMPT_ROUND_TRIPS", 0.1)  # 2 s attempts, not 40 s: a short test
    storage.clear_cache()
    url = s3_server.unique_url("hung") + "/object.json"
    proxy.down("blackhole")
    writer, got = _in_background(lambda: storage.atomic_write_bytes(url, b"payload"))
    assert proxy.wait_for_hits(2, timeout_s=240), "the held attempt was never cut and retried"
    # the next attempts get the default bound, so a slow (loaded) server is not cut again and again
    monkeypatch.setattr(storage, "ATTEMPT_ROUND_TRIPS", default_round_trips)
    proxy.up()
    writer.join(timeout=600)
    assert got == {"result": None}
    assert storage.read_bytes(url) == b"payload"


def test_parquet_reads_are_bounded_too(s3_server, proxy, monkeypatch):
    """pyarrow's native S3 client (Parquet scans in the pipelines) against a server that never answers."""
    from workflows.pipelines.shards import plan_shards, read_shard

    data = write_tiny(s3_server.unique_url("pq"), n_train=1, n_normal=1, n_anomalous=1)
    (shard, *_) = plan_shards(data, split="test", shard_size=2, datasets=["textures"])
    assert read_shard(shard).num_rows >= 1
    monkeypatch.setenv(storage.DEADLINE_ENV, "5")
    proxy.down("blackhole")
    started = time.monotonic()
    with pytest.raises(storage.StorageError):
        read_shard(shard)
    assert time.monotonic() - started < 300


def _a_shard_done(output: str) -> bool:
    markers = [u for u in storage.list_urls(output, recursive=True) if "/done/" in u] \
        if storage.exists(output) else []
    return bool(markers)


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_server
    ray.shutdown()


def _start_driver(data: str, output: str, proxy: OutageProxy, log: Path, **env_extra: str
                  ) -> subprocess.Popen:
    """`residual-ad evaluate` as its own process (and process group, with its own local Ray), talking
    to S3 through the proxy."""
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint_url, "RAY_ADDRESS": "", **env_extra}
    with open(log, "wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "workflows.cli", "evaluate",
                                 *cli_args(data, output, *SETTINGS)], cwd=ROOT, env=env, stdout=handle,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until(condition, driver: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while driver.poll() is None and time.monotonic() < deadline and not condition():
        time.sleep(0.2)


def _stop(driver: subprocess.Popen) -> None:
    if driver.poll() is None:
        from tests.faults.helpers import kill_process_group

        kill_process_group(driver.pid)
        driver.wait(timeout=60)


def _lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def _rerun_equals_reference(s3_ray, data: str, output: str) -> None:
    from workflows.pipelines.evaluate import run_evaluate

    (rerun,) = run_evaluate(config(data, output, *SETTINGS), progress=False)  # resumes (or reuses)
    (reference,) = run_evaluate(config(data, s3_ray.unique_url("reference"), *SETTINGS), progress=False)
    assert rerun.completed and rerun.counts == reference.counts
    assert_same_results(result_rows(rerun.job_url), result_rows(reference.job_url))


def test_outage_mid_evaluate_then_rerun_resumes(s3_ray, tmp_path):
    data = write_tiny(s3_ray.unique_url("data"), n_train=2, n_normal=4, n_anomalous=4)
    output = s3_ray.unique_url("out")
    proxy = OutageProxy(int(s3_ray.endpoint_url.rsplit(":", 1)[1]))
    log = tmp_path / "driver.log"
    # a generous bound: the outage lasts until the test sees it hit, however slow the machine
    driver = _start_driver(data, output, proxy, log, RESIDUAL_AD_S3_DEADLINE_S="600")
    try:
        _wait_until(lambda: _a_shard_done(output), driver)  # mid-run: shards are being read and committed
        proxy.down("refuse")
        _wait_until(lambda: proxy.hits() >= 3, driver)  # the run met the outage (or had already ended)
        proxy.up()
        driver.wait(timeout=600)
    finally:
        _stop(driver)
        proxy.close()
    printed = log.read_text(errors="replace")
    assert FAKE_SECRET not in printed
    assert driver.returncode == 0, printed[-3000:]  # carried through by the retries
    _rerun_equals_reference(s3_ray, data, output)


def test_permanent_outage_fails_within_the_bound_then_rerun_resumes(s3_ray, tmp_path):
    """S3 stops answering for good mid-`evaluate` (the worst case: connections accepted, never served):
    the driver fails with one clear line within the configured bound; once S3 is back, a rerun resumes."""
    data = write_tiny(s3_ray.unique_url("data"), n_train=2, n_normal=4, n_anomalous=4)
    output = s3_ray.unique_url("out")
    proxy = OutageProxy(int(s3_ray.endpoint_url.rsplit(":", 1)[1]))
    log = tmp_path / "driver.log"
    driver = _start_driver(data, output, proxy, log, RESIDUAL_AD_S3_DEADLINE_S="10")
    try:
        _wait_until(lambda: _a_shard_done(output), driver)
        assert driver.poll() is None, "evaluate ended before the outage:\n" + log.read_text()[-3000:]
        proxy.down("blackhole")
        down_at = time.monotonic()
        driver.wait(timeout=600)  # a hang fails here
        failed_after = time.monotonic() - down_at
    finally:
        _stop(driver)
    printed = log.read_text(errors="replace")
    assert driver.returncode == 1, printed[-3000:]
    last = _lines(printed)[-1]
    assert last.startswith("residual-ad evaluate: error: StorageError: "), printed[-3000:]
    assert "RESIDUAL_AD_S3_DEADLINE_S=10" in last and "rerun" in last
    assert FAKE_SECRET not in printed
    # 10 s per storage call; generous for Ray's own teardown on a loaded machine, far below a hang
    assert failed_after < 300, failed_after
    proxy.close()
    _rerun_equals_reference(s3_ray, data, output)
