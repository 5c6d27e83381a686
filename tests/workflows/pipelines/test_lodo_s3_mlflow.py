"""train and lodo end to end with data and outputs on S3 (moto server) and MLflow on a real server."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.cli import main  # noqa: E402

TRAINABLE = "{name: resadpp, params: {epochs: 1, first_stage_epochs: 1, batch_size: 4, coupling_layers: 2}}"


@pytest.fixture(scope="module")
def s3_ray(s3_server):
    """Local Ray started after the S3 environment is set, so its workers inherit it."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)  # never join a stray cluster
    yield s3_server
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_data(s3_ray):
    return write_tiny(s3_ray.unique_url("data"), n_train=2, n_normal=2, n_anomalous=2)


def _sets(*items):
    return [f"--set={item}" for item in items]


def test_lodo_on_s3_logs_the_mlflow_layout(s3_ray, s3_data, mlflow_server, capsys):
    from mlflow.tracking import MlflowClient

    output = s3_ray.unique_url("runs")
    args = _sets(f"data.url={s3_data}", f"output={output}", "backbone.image_size=64", "index.shots=[1]",
                 "index.seeds=[0]", "data.datasets=[textures,photos,labels]",
                 "train.max_images_per_category=4", "train.ref_shot=2", "tracking.experiment=lodo-test",
                 f"lodo.methods=[{{name: baseline}}, {TRAINABLE}]")
    assert main(["lodo", *args]) == 0
    printed = capsys.readouterr().out
    # labels and photos share a source group: neither fold trains on the other
    assert "hold out labels (group g-photo); train on textures" in printed
    assert "hold out textures (group g-tex); train on photos, labels" in printed
    assert "| photos | resadpp | 1 |" in printed

    client = MlflowClient(mlflow_server.tracking_uri)
    experiment = client.get_experiment_by_name("lodo-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("kind") == "lodo"]
    assert len(parents) == 1
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trains = [r for r in children if r.data.tags["kind"] == "train"]
    evals = [r for r in children if r.data.tags["kind"] == "evaluate"]
    assert len(trains) == 2  # folds labels and photos share their training set (textures): one job
    assert len(evals) == 3 * 2  # held-out datasets x methods (one k, one seed)
    assert all(any(key.startswith("train/") for key in r.data.metrics) for r in trains)
    some_eval = next(r for r in evals if r.data.tags["holdout"] == "textures")
    assert "textures/I-AUROC" in some_eval.data.metrics
    assert "textures/brick/AUPRO_0.3" in some_eval.data.metrics
    assert some_eval.data.params["backbone_identity.name"] == "effnet-lite0"
    assert "reference_ids.textures/brick" in some_eval.data.params
    label_eval = next(r for r in evals if r.data.tags["holdout"] == "labels")
    assert "labels/I-AUROC" in label_eval.data.metrics and "labels/P-AUROC" not in label_eval.data.metrics
    assert "textures/baseline/k1/I-AUROC_mean" in parent.data.metrics
    # one seed: the standard deviation over seeds is not defined, so it is not logged as 0
    assert "textures/baseline/k1/I-AUROC_std" not in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"summary.csv", "summary.md"} <= artifacts
    assert "results.parquet" in {a.path for a in client.list_artifacts(some_eval.info.run_id)}
    # outputs went to S3, and no credential reached MLflow params
    assert storage.list_urls(storage.join(output, "evaluate"))
    assert all("testing-secret" not in value for r in runs for value in r.data.params.values())


def test_train_command_on_s3(s3_ray, s3_data, capsys):
    output = s3_ray.unique_url("train")
    args = _sets(f"data.url={s3_data}", f"output={output}", "backbone.image_size=64",
                 "tracking.enabled=false", "train.datasets=[textures,labels]",
                 "train.max_images_per_category=4", "train.ref_shot=2", f"method={TRAINABLE}")
    assert main(["train", *args]) == 0
    printed = capsys.readouterr().out
    # resadpp also gets every normal train image (2 per category here) as its authors do
    assert ("labels: 4 test images + 2 normal train images in 1 categories, losses without masks only"
            in printed)
    assert "textures: 8 test images + 4 normal train images in 2 categories, all losses" in printed
    (checkpoint,) = [line.split(": ", 1)[1] for line in printed.splitlines()
                     if line.startswith("checkpoint:")]
    assert storage.is_committed(checkpoint)
    assert main(["train", *args]) == 0  # a committed checkpoint is reused
    assert "(reused)" in capsys.readouterr().out
