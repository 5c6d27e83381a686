"""`evaluate` on a real MLflow server: one parent run with a nested run per (k, seed), the summary folder
on storage and as parent artifacts; `log-results <summary folder>` into a fresh experiment logs the same
layout (same params, metrics and artifacts)."""

from __future__ import annotations

import csv
import io

import pytest

ray = pytest.importorskip("ray")

from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.cli import main  # noqa: E402

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def ray_with_mlflow(s3_server, mlflow_server):
    """Local Ray started after the S3 and MLflow environment is set (workers inherit it)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield mlflow_server
    ray.shutdown()


def _layout(client, experiment: str):
    """(parent, {job URL: nested run}) of the experiment's only evaluate parent run."""
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "evaluations"]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(nested)  # nothing else, no top-level evaluation runs
    return parent, {r.data.params["results_url"]: r for r in nested}


def _artifacts(client, run) -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id)}


def _params(run) -> dict:
    return dict(run.data.params)


def test_evaluate_parent_nested_summary_and_log_results(ray_with_mlflow, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    data = write_tiny(str(tmp_path / "data"), n_train=2, n_normal=2, n_anomalous=2)
    output = str(tmp_path / "out")
    seeds = ",".join(map(str, SEEDS))
    args = [f"--set={item}" for item in (
        f"data.url={data}", f"output={output}", "backbone.image_size=64", "index.shots=[1]",
        f"index.seeds=[{seeds}]", "data.datasets=[textures,labels]", "tracking.experiment=evaluate-layout")]
    assert main(["evaluate", *args]) == 0
    printed = capsys.readouterr().out

    (folder,) = storage.list_urls(storage.join(output, "evaluations"))
    assert f"summary: {folder}" in printed
    summary_md = storage.read_bytes(storage.join(folder, "summary.md")).decode()
    summary_csv = storage.read_bytes(storage.join(folder, "summary.csv")).decode()
    assert summary_md in printed  # the table printed is the one stored
    rows = list(csv.DictReader(io.StringIO(summary_csv)))
    assert [(r["dataset"], r["method"], r["k"], r["seeds"]) for r in rows] == [
        ("labels", "baseline", "1", "2"), ("textures", "baseline", "1", "2")]
    assert storage.exists(storage.join(folder, "config.yaml"))
    jobs = storage.read_json(storage.join(folder, "jobs.json"))
    job_urls = {entry["url"] for entry in jobs["evaluations"]}
    assert job_urls == set(storage.list_urls(storage.join(output, "evaluate")))
    assert len(job_urls) == len(SEEDS)

    client = MlflowClient(ray_with_mlflow.tracking_uri)
    parent, nested = _layout(client, "evaluate-layout")
    assert parent.info.run_name == "evaluate labels+textures baseline"
    assert set(nested) == job_urls
    assert parent.data.params["results_url"] == folder
    assert parent.data.params["backbone_identity.name"] == "effnet-lite0"
    assert "textures/baseline/k1/I-AUROC_mean" in parent.data.metrics
    assert "textures/baseline/k1/I-AUROC_std" in parent.data.metrics  # two seeds: defined
    assert {"summary.csv", "summary.md"} <= _artifacts(client, parent)
    local = client.download_artifacts(parent.info.run_id, "summary.csv", str(tmp_path / "dl"))
    assert open(local, newline="").read() == summary_csv
    assert {r.data.params["seed"] for r in nested.values()} == {str(s) for s in SEEDS}
    for run in nested.values():
        assert run.data.tags["kind"] == "evaluate"
        assert "textures/I-AUROC" in run.data.metrics and "textures/brick/AUPRO_0.3" in run.data.metrics
        assert run.data.params["backbone_identity.name"] == "effnet-lite0"
        assert {"metrics.json", "results.parquet", "curves", "gallery"} <= _artifacts(client, run)

    # the stored folder, logged later into a fresh experiment: the same layout
    assert main(["log-results", folder, "--experiment", "evaluate-layout-later"]) == 0
    out = capsys.readouterr().out
    assert "1 run(s) logged" in out
    again, again_nested = _layout(client, "evaluate-layout-later")
    assert again.info.run_name == parent.info.run_name
    assert again.data.tags["logged_from"] == folder
    assert _params(again) == _params(parent)
    assert again.data.metrics == parent.data.metrics
    assert _artifacts(client, again) == _artifacts(client, parent)
    assert set(again_nested) == job_urls
    for url, run in nested.items():
        later = again_nested[url]
        assert later.info.run_name == run.info.run_name and later.data.tags["logged_from"] == url
        assert _params(later) == _params(run)
        assert later.data.metrics == run.data.metrics
        assert _artifacts(client, later) == _artifacts(client, run)

    # logged already: nothing twice, neither the folder nor (through the output root) its jobs
    assert main(["log-results", output, "--experiment", "evaluate-layout-later"]) == 0
    out = capsys.readouterr().out
    assert f"already logged: {folder}" in out and "0 run(s) logged" in out


def test_train_logs_every_step_to_the_run_open_while_training(ray_with_mlflow, tmp_path):
    """`train`: the MLflow run is open while the task trains and gets every step's loss terms as they
    stream in; then params and artifacts complete it (one run, FINISHED)."""
    from mlflow.tracking import MlflowClient

    data = write_tiny(str(tmp_path / "data"), n_train=5, n_normal=2, n_anomalous=2)
    params = {"epochs": 2, "first_stage_epochs": 1, "batch_size": 4, "coupling_layers": 1,
              "num_embeddings": 16, "pos_embed_dim": 8}
    args = [f"--set={item}" for item in (
        f"data.url={data}", f"output={tmp_path / 'out'}", "backbone.image_size=64", "method.name=resadpp",
        "train.datasets=[textures]", "tracking.experiment=train-live", "train.ref_shot=2",
        *(f"method.params.{key}={value}" for key, value in params.items()))]
    assert main(["train", *args]) == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("train-live").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["kind"] == "train"
    history = client.get_metric_history(run.info.run_id, "train/loss_occ")
    # textures: 2 categories x 5 train images (stage 1: 2 batches of 4), + 8 test images (stage 2: 4)
    assert sorted(m.step for m in history) == list(range(1, 7))
    log = storage.read_json(storage.join(run.data.params["checkpoint"], "train_log.json"))
    streamed = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert streamed == [values["loss_occ"] for _, values in log["losses"]]
