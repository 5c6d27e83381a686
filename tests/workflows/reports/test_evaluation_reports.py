"""Reports of a committed evaluation job (local and s3://): the right files per category, the gallery
shows the right images, datasets without masks get no PRO curve and say why."""

from __future__ import annotations

import pytest

from tests.workflows.reports.fake_job import build_job, source_index
from workflows.datasets.reader import read_table
from workflows.reports.evaluation import artifact_stems, write_evaluation_reports
from workflows.reports.selection import HIGH_NORMALS, LOW_ANOMALIES, TYPICAL_ANOMALIES, TYPICAL_NORMALS


def _sources(data_url: str) -> dict[str, int]:
    table = read_table(data_url, columns=["image_id", "source"])
    return {i: source_index(s) for i, s in zip(table["image_id"].to_pylist(), table["source"].to_pylist(),
                                               strict=True)}


def _gallery_indices(report, sources) -> dict[str, list[int]]:
    return {group: [sources[i] for i in ids] for group, ids in report.gallery_images.items()}


@pytest.fixture(scope="module")
def full_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    build_job(str(root / "data"), str(root / "job"))
    reports = write_evaluation_reports(str(root / "job"), str(root / "out"))
    return str(root / "data"), {r.name: r for r in reports}


def test_each_category_gets_curves_and_a_gallery(full_job):
    _, reports = full_job
    assert sorted(reports) == ["elpv/mono", "textures/brick"]
    assert sorted(reports["textures/brick"].files) == ["curves/brick_pro.png", "curves/brick_roc.png",
                                                       "gallery/brick.png"]
    assert reports["textures/brick"].missing == {}
    assert sorted(reports["elpv/mono"].files) == ["curves/mono_roc.png", "gallery/mono.png"]


def test_dataset_without_masks_has_no_pixel_or_pro_curve_and_says_why(full_job):
    _, reports = full_job
    missing = reports["elpv/mono"].missing
    assert set(missing) == {"pixel ROC", "PRO"}
    assert all("no pixels with a ground-truth mask" in reason for reason in missing.values())


def test_gallery_shows_highest_normals_and_lowest_anomalies(full_job):
    data_url, reports = full_job
    picked = _gallery_indices(reports["textures/brick"], _sources(data_url))
    # scores by construction: normal i -> 0.1 (i + 1), anomaly i -> 0.35 + 0.15 (i - 6)
    assert picked[HIGH_NORMALS] == [5, 4, 3, 2]
    assert picked[LOW_ANOMALIES] == [6, 7, 8, 9]
    assert picked[TYPICAL_NORMALS] == [0, 1] and picked[TYPICAL_ANOMALIES] == [10]


def test_gallery_picks_the_true_extremes_even_without_their_stored_maps(tmp_path):
    """Maps stored for a sample only and no recorded scoring setup (a job of an older version): the
    gallery still shows the run's true extremes, with the stored maps where there are some."""
    build_job(str(tmp_path / "data"), str(tmp_path / "job"), maps_only_for={0, 2, 4, 6, 8, 10})
    reports = {r.name: r for r in write_evaluation_reports(str(tmp_path / "job"), str(tmp_path / "out"),
                                                           per_group=2)}
    sources = _sources(str(tmp_path / "data"))
    report = reports["textures/brick"]
    picked = _gallery_indices(report, sources)
    assert picked[HIGH_NORMALS] == [5, 4] and picked[LOW_ANOMALIES] == [6, 7]
    shown = {i for ids in report.gallery_images.values() for i in ids}
    assert report.map_sources == {i: "stored" for i in shown if sources[i] in {0, 2, 4, 6, 8, 10}}


def test_reports_read_a_job_on_s3(s3_server):
    import tempfile

    base = s3_server.unique_url("reports")
    build_job(f"{base}/data", f"{base}/job", maps_only_for={1, 5, 7, 9}, shard_size=6)
    with tempfile.TemporaryDirectory() as out:
        reports = {r.name: r for r in write_evaluation_reports(f"{base}/job", out)}
        assert sorted(reports["textures/brick"].files) == ["curves/brick_pro.png", "curves/brick_roc.png",
                                                           "gallery/brick.png"]
        picked = _gallery_indices(reports["textures/brick"], _sources(f"{base}/data"))
        assert picked[HIGH_NORMALS] == [5, 4, 3, 2] and picked[LOW_ANOMALIES] == [6, 7, 8, 9]


def test_stems_are_categories_unless_two_datasets_share_one():
    assert artifact_stems(["a/bottle", "b/cable"]) == {"a/bottle": "bottle", "b/cable": "cable"}
    assert artifact_stems(["a/bottle", "b/bottle", "b/x y"]) == {
        "a/bottle": "a_bottle", "b/bottle": "b_bottle", "b/x y": "x_y"}
