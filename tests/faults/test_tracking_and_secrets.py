"""MLflow unreachable during a run (never started, or gone mid-run): the run completes, its results stay
committed on storage, one warning line names the `residual-ad log-results URL` command, and that command
logs them later (only what is missing, once). The MLflow URI's password never shows. A failing
`log-results` is one clear line. (No secret anywhere, for every command: `test_secrets_everywhere.py`.)"""

from __future__ import annotations

import re
import socket
from urllib.parse import quote

import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import cli_args  # noqa: E402
from tests.faults.outage_proxy import OutageProxy  # noqa: E402
from tests.fixtures.mlflow import CLIENT_BOUNDS  # noqa: E402
from tests.fixtures.s3 import FAKE_SECRET  # noqa: E402
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.cli import main  # noqa: E402

pytestmark = pytest.mark.timeout(900)
PASSWORD = "Mlf/pass@Wq4-z"  # '/' and '@' in a password: the URL holds it percent-encoded


@pytest.fixture(scope="module")
def s3_ray(s3_server, mlflow_server):
    """Local Ray started after the S3 env is set (workers inherit it)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield s3_server
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_data(s3_ray):
    return write_tiny(s3_ray.unique_url("data"), n_train=2, n_normal=2, n_anomalous=2)


@pytest.fixture
def refusing_port():
    """A port that is ours for the test and refuses connections (bound, never listening): no other
    process can start listening there meanwhile."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


def _with_password(url: str) -> str:
    return url.replace("http://", f"http://user:{quote(PASSWORD, safe='')}@")


def _evaluate(data: str, output: str, experiment: str, *extra: str) -> int:
    return main(["evaluate", *cli_args(data, output, "data.datasets=[labels]", "tracking.enabled=true",
                                       f"tracking.experiment={experiment}", "evaluate.shard_size=2", *extra)])


def _lines(text: str) -> list[str]:
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()]


def _no_password(text: str) -> None:
    for form in (PASSWORD, quote(PASSWORD, safe=""), quote(PASSWORD), FAKE_SECRET):
        assert form not in text


def _real_server(monkeypatch, mlflow_server) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _with_password(mlflow_server.tracking_uri))
    for key, value in CLIENT_BOUNDS.items():
        monkeypatch.setenv(key, value)


def test_mlflow_never_started_then_log_results_later(s3_ray, s3_data, mlflow_server, refusing_port,
                                                     monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    output = s3_ray.unique_url("mlflow-down")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _with_password(f"http://127.0.0.1:{refusing_port}"))
    for key in CLIENT_BOUNDS:  # the product's own bounds (tracking.REQUEST_BOUNDS)
        monkeypatch.delenv(key, raising=False)
    capfd.readouterr()
    assert _evaluate(s3_data, output, "down-then-up") == 0  # the run completes
    printed = capfd.readouterr()
    _no_password(printed.out + printed.err)
    (job_url,) = storage.list_urls(storage.join(output, "evaluate"))
    assert storage.is_committed(job_url)  # the results are safe on storage
    (folder,) = storage.list_urls(storage.join(output, "evaluations"))  # and the summary folder
    warnings = [line for line in _lines(printed.err) if "MLflow" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: MLflow tracking failed at http://***@127")
    assert warnings[0].endswith(f"`residual-ad log-results {folder}`")
    saved = storage.read_json(storage.join(job_url, "metrics.json"))

    _real_server(monkeypatch, mlflow_server)
    assert main(["log-results", folder]) == 0  # the parent run and the job's nested run
    printed = capfd.readouterr()
    assert "1 run(s) logged" in printed.out
    _no_password(printed.out + printed.err)
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("down-then-up")  # the stored config's experiment
    (run,) = client.search_runs([experiment.experiment_id], f"tags.logged_from = '{job_url}'")
    auroc = saved["per_dataset"]["labels"]["I-AUROC"]
    assert run.data.metrics["labels/I-AUROC"] == pytest.approx(auroc)
    assert run.data.metrics["images"] == saved["counts"]["images"]
    assert {"metrics.json", "results.parquet"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert main(["log-results", folder]) == 0  # idempotent: nothing logged twice
    assert "already logged" in capfd.readouterr().out


def test_mlflow_gone_mid_run_then_log_results_adds_only_what_is_missing(s3_ray, s3_data, mlflow_server,
                                                                         monkeypatch, capfd):
    """The server goes away (a proxy in front of the real server starts refusing) exactly when the run
    creates its third MLflow run (the parent, then one nested run per evaluation): the first evaluation
    is logged, the second is not."""
    from mlflow.tracking import MlflowClient

    output = s3_ray.unique_url("mlflow-gone")
    proxy = OutageProxy(int(mlflow_server.tracking_uri.rsplit(":", 1)[1]))
    try:
        proxy.down_on(b"/runs/create", after=2)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", _with_password(proxy.endpoint_url))
        capfd.readouterr()
        assert _evaluate(s3_data, output, "gone-mid-run", "index.seeds=[0,1]") == 0
        printed = capfd.readouterr()
        assert proxy.mode == "refuse"  # it did go down mid-run
    finally:
        proxy.close()
    _no_password(printed.out + printed.err)
    (folder,) = storage.list_urls(storage.join(output, "evaluations"))
    warnings = [line for line in _lines(printed.err) if "MLflow" in line]
    assert len(warnings) == 1 and warnings[0].endswith(f"`residual-ad log-results {folder}`"), warnings
    jobs = storage.list_urls(storage.join(output, "evaluate"))
    assert len(jobs) == 2 and all(storage.is_committed(job) for job in jobs)

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("gone-mid-run")

    def finished_runs_of(job: str) -> list:
        return [r for r in client.search_runs([experiment.experiment_id])
                if r.info.status == "FINISHED"
                and job in (r.data.params.get("results_url"), r.data.tags.get("logged_from"))]

    logged_before = [job for job in jobs if finished_runs_of(job)]
    assert len(logged_before) == 1  # the first evaluation made it, the second did not

    _real_server(monkeypatch, mlflow_server)
    assert main(["log-results", output]) == 0  # the output root: logs what is missing
    out = capfd.readouterr().out
    # the unfinished parent again, with a nested run for the evaluation that was not logged
    assert f"already logged: {logged_before[0]}" in out and f"logged summary: {folder}" in out
    assert "1 run(s) logged" in out
    assert all(len(finished_runs_of(job)) == 1 for job in jobs)  # each job exactly once


def test_log_results_fails_with_one_clear_line_when_mlflow_is_down(s3_ray, s3_data, refusing_port,
                                                                    monkeypatch, capfd):
    output = s3_ray.unique_url("log-down")
    assert _evaluate(s3_data, output, "log-down", "tracking.enabled=false") == 0
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _with_password(f"http://127.0.0.1:{refusing_port}"))
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    capfd.readouterr()
    assert main(["log-results", output]) == 1
    printed = capfd.readouterr()
    _no_password(printed.out + printed.err)
    last = _lines(printed.err)[-1]
    assert last.startswith("residual-ad log-results: error: TrackingError: MLflow at http://***@127.0.0.1:")
    assert "Traceback" not in printed.err
