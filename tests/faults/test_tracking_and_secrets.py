"""MLflow down at the end of a run: the results stay on object storage and `residual-ad log-results`
logs them later, nothing lost. And no secret from the environment reaches logs, MLflow params, tags or
artifacts, or anything written to storage (data and outputs on the local S3 server)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from tests.faults.helpers import cli_args  # noqa: E402
from tests.fixtures.s3 import FAKE_SECRET  # noqa: E402
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.cli import main  # noqa: E402

pytestmark = pytest.mark.timeout(600)
EXTRA_SECRET = "extra-secret-value-Pq7Lm2Xv"  # an unrelated secret in the environment


@pytest.fixture(scope="module")
def s3_ray(s3_server, mlflow_server):
    """Local Ray started after the S3 env is set (workers inherit it), with one more secret in the env."""
    import os

    saved = os.environ.get("MLFLOW_TRACKING_TOKEN")
    os.environ["MLFLOW_TRACKING_TOKEN"] = EXTRA_SECRET  # the server ignores it; it must never be logged
    ray.init(num_cpus=2, include_dashboard=False)
    yield s3_server
    ray.shutdown()
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_TOKEN", None)
    else:
        os.environ["MLFLOW_TRACKING_TOKEN"] = saved


@pytest.fixture(scope="module")
def s3_data(s3_ray):
    return write_tiny(s3_ray.unique_url("data"), n_train=2, n_normal=2, n_anomalous=2)


def _evaluate(data: str, output: str, experiment: str) -> int:
    return main(["evaluate", *cli_args(data, output, "data.datasets=[labels]", "tracking.enabled=true",
                                       f"tracking.experiment={experiment}", "evaluate.shard_size=2")])


def test_mlflow_down_at_the_end_then_log_results_later(s3_ray, s3_data, mlflow_server, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from infra.local.services import free_port

    output = s3_ray.unique_url("mlflow-down")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with pytest.raises(Exception) as caught:  # noqa: B017 - whatever mlflow raises when unreachable
        _evaluate(s3_data, output, "down-then-up")
    assert "127.0.0.1" in str(caught.value) or "onnect" in str(caught.value)
    (job_url,) = storage.list_urls(storage.join(output, "evaluate"))
    assert storage.is_committed(job_url)  # the results are safe on storage
    saved = storage.read_json(storage.join(job_url, "metrics.json"))

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.tracking_uri)
    assert main(["log-results", output]) == 0
    assert "1 run(s) logged" in capsys.readouterr().out
    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("down-then-up")  # the stored config's experiment
    (run,) = client.search_runs([experiment.experiment_id], f"tags.logged_from = '{job_url}'")
    auroc = saved["per_dataset"]["labels"]["I-AUROC"]
    assert run.data.metrics["labels/I-AUROC"] == pytest.approx(auroc)
    assert run.data.metrics["images"] == saved["counts"]["images"]
    assert {"metrics.json", "results.parquet"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert main(["log-results", output]) == 0  # idempotent: nothing logged twice
    assert "already logged" in capsys.readouterr().out


def test_no_secret_reaches_logs_mlflow_or_storage(s3_ray, s3_data, mlflow_server, capfd, tmp_path):
    from mlflow.tracking import MlflowClient

    output = s3_ray.unique_url("secrets")
    assert _evaluate(s3_data, output, "secrets") == 0
    printed = capfd.readouterr()
    secrets = [FAKE_SECRET, EXTRA_SECRET]
    for secret in secrets:
        assert secret not in printed.out + printed.err

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("secrets")
    runs = client.search_runs([experiment.experiment_id])
    assert runs
    for run in runs:
        text = repr(run.data.params) + repr(run.data.tags)
        assert not any(secret in text for secret in secrets)
        local = client.download_artifacts(run.info.run_id, "", str(tmp_path / run.info.run_id))
        for path in __import__("pathlib").Path(local).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(secret.encode() in data for secret in secrets), path

    written = storage.list_urls(output, recursive=True) + storage.list_urls(s3_data, recursive=True)
    assert any(url.endswith("_manifest.json") for url in written) and any("config.yaml" in u for u in written)
    for url in written:
        data = storage.read_bytes(url)
        assert not any(secret.encode() in data for secret in secrets), url

    session = ray._private.worker._global_node.get_session_dir_path()
    for path in __import__("pathlib").Path(session, "logs").rglob("*"):
        if path.is_file() and path.stat().st_size < 20_000_000:
            data = path.read_bytes()
            assert not any(secret.encode() in data for secret in secrets), path
