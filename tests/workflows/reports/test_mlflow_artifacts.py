"""The evaluation run in a real MLflow server gets curves/<category>_roc.png, _pro.png (masks only),
gallery/<category>.png and, where a curve is missing, the reason next to it."""

from __future__ import annotations

import os

from tests.workflows.reports.fake_job import build_job
from workflows.tracking import Tracker, log_evaluation_reports


def _artifact_paths(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifact_paths(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def test_evaluation_run_gets_curve_and_gallery_artifacts(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    build_job(str(tmp_path / "data"), str(tmp_path / "job"), maps_only_for={0, 3, 5, 6, 9})
    tracker = Tracker("reports-artifacts")
    with tracker.run("eval textures+elpv baseline k=1 seed=0") as run:
        reports = log_evaluation_reports(tracker, str(tmp_path / "job"))
    assert [r.name for r in reports] == ["elpv/mono", "textures/brick"]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    paths = _artifact_paths(client, run.info.run_id)
    assert sorted(paths) == ["curves/brick_pro.png", "curves/brick_roc.png", "curves/mono_missing.txt",
                             "curves/mono_roc.png", "gallery/brick.png", "gallery/mono.png"]
    local = client.download_artifacts(run.info.run_id, "curves/mono_missing.txt", str(tmp_path / "dl"))
    text = open(local).read()
    assert "PRO: no pixels with a ground-truth mask" in text and "pixel ROC:" in text
    png = client.download_artifacts(run.info.run_id, "gallery/brick.png", str(tmp_path / "dl"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_disabled_tracker_writes_nothing(tmp_path):
    assert log_evaluation_reports(Tracker("x", enabled=False), str(tmp_path / "missing")) == []
