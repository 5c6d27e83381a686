"""`scan` end to end on a generated archive (local and s3://): flags, regions, bad inputs, calibration."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from tests.workflows.scan.archive import overlay_files, upload, write_archive, write_normals  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.pipelines.calibration import threshold_at_fpr  # noqa: E402
from workflows.pipelines.scan import ScanOptions, run_scan  # noqa: E402
from workflows.pipelines.scan_outputs import ScanStore  # noqa: E402
from workflows.reports.overlay import overlay_size  # noqa: E402

CONFIG = ["backbone.image_size=64", "tracking.enabled=false", "device=cpu", "evaluate.batch_size=32"]
MAX_PIXELS = 200_000  # the generated 640x640 image is "far larger" than this limit


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """Ray workers inherit the environment at start: the S3 server's settings must be set first."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    archive = write_archive(str(root / "archive"), per_category=1000)
    write_normals(str(root / "references"), 4, seed=1)
    write_normals(str(root / "normals"), 100, seed=2)
    return root, archive


def _options(root, output, **extra) -> ScanOptions:
    return ScanOptions(input=str(root / "archive"), output=output, references=str(root / "references"),
                       normals=str(root / "normals"), max_pixels=MAX_PIXELS, **extra)


@pytest.fixture(scope="module")
def local_scan(local_ray, folders):
    root, archive = folders
    output = str(root / "out")
    summary = run_scan(load_config(None, CONFIG), _options(root, output), progress=False)
    print("local scan:", summary["this_run"])
    return summary, ScanStore(output), archive


def _overlaps(box, row) -> bool:
    width = min(box[2], row["bbox_x1"]) - max(box[0], row["bbox_x0"])
    height = min(box[3], row["bbox_y1"]) - max(box[1], row["bbox_y0"])
    return width > 0 and height > 0


def test_scan_flags_pasted_defects_and_locates_them(local_scan):
    summary, store, archive = local_scan
    rows = store.read_table("results").to_pylist()
    assert len(rows) == len({r["source"] for r in rows}) == 2000 == summary["scored"]
    defects = [r for r in rows if archive.images[r["source"]]["defect"]]
    normals = [r for r in rows if not archive.images[r["source"]]["defect"]]
    assert len(defects) == 200
    flagged = [r for r in defects if r["flag"]]
    assert len(flagged) >= 0.95 * len(defects)  # observed: all of them
    located = [r for r in flagged if _overlaps(archive.images[r["source"]]["defect"], r)]
    assert len(located) >= 0.9 * len(flagged)
    assert np.mean([r["flag"] for r in normals]) <= 0.06  # calibrated at 1% on 100 held-out normals
    assert {r["category"] for r in rows} == {"brick", "grass"}
    assert all(r["score_visual"] == r["score"] for r in rows)  # per-branch scores (baseline: one branch)
    assert all(0 < r["area_fraction"] <= 1 for r in rows)
    maps = store.read_table("maps").to_pylist()  # one heat map per flagged image, PNG bytes
    assert sorted(m["source"] for m in maps) == sorted(r["source"] for r in rows if r["flag"])
    assert Image.open(io.BytesIO(maps[0]["heatmap_png"])).size == (64, 64)
    assert storage.exists(storage.join(store.url, "results", "category=brick"))
    # one overlay PNG file per flagged image, named in the maps table, at the overlay size
    assert overlay_files(store) == {m["overlay"] for m in maps}
    assert len(maps) == summary["flagged"] == summary["overlays"]
    assert summary["overlays"] == sum(m["overlays"] for m in store.markers())
    for m in maps[:20]:
        assert m["overlay"].startswith(f"maps/category={m['category']}/")
        image = Image.open(io.BytesIO(storage.read_bytes(storage.join(store.url, m["overlay"]))))
        assert image.format == "PNG" and image.size == overlay_size(64, 2)
    assert set(summary["overlay_scales"]) == {"brick", "grass"}


def test_bad_inputs_are_skipped_with_reasons_and_counts_reconcile(local_scan):
    summary, store, archive = local_scan
    skipped = {r["source"]: r["reason"] for r in store.read_table("skipped").to_pylist()}
    assert set(skipped) == set(archive.bad)
    for key, fragment in archive.bad.items():
        assert fragment in skipped[key], (key, skipped[key])
    assert summary["seen"] == summary["planned_images"] == len(archive.keys()) == 2009
    assert summary["seen"] == summary["scored"] + summary["skipped"] and summary["reconciles"]
    assert summary["per_category"]["gravel"] == {"seen": 5, "scored": 0, "skipped": 5, "flagged": 0,
                                                 "flagged_fraction": 0.0}
    assert summary["categories_without_references"] == ["gravel"]
    assert summary["skip_reasons"]["no references for category gravel"] == 5
    assert summary["throughput_images_per_s"] > 0 and summary["driver_peak_rss_mb"] > 0


def test_calibration_at_target_fpr_is_stored_with_the_results(local_scan):
    summary, store, _ = local_scan
    calibration = storage.read_json(storage.join(store.url, "calibration.json"))
    assert calibration == summary["calibration"] and calibration["target_fpr"] == 0.01
    assert calibration["method"]["name"] == "baseline" and calibration["backbone"]["image_size"] == 64
    normals = ScanStore(storage.join(store.url, "calibration"))
    results = store.read_table("results").to_pylist()
    for category in ("brick", "grass"):
        scores = np.asarray(normals.read_table("results", category).column("score"))
        entry = calibration["categories"][category]
        assert len(scores) == entry["normals"] == 100
        assert entry["threshold"] == pytest.approx(threshold_at_fpr(scores, 0.01))
        assert (scores > entry["threshold"]).mean() == pytest.approx(entry["empirical_fpr"])
        assert entry["empirical_fpr"] <= 0.01
        used = [r["threshold"] for r in results if r["category"] == category]
        assert used and all(value == pytest.approx(entry["threshold"]) for value in used)


def test_a_finished_scan_is_not_rescored(local_scan, folders):
    summary, store, _ = local_scan
    root, _ = folders
    again = run_scan(load_config(None, CONFIG), _options(root, store.url), progress=False)
    assert again["run_id"] == summary["run_id"] and again["by_run"] == summary["by_run"]


def test_fixed_threshold_scan_on_s3(local_ray, folders, s3_server, tmp_path):
    root, _ = folders
    small = write_archive(str(tmp_path / "small"), per_category=60, seed=3)
    base = s3_server.unique_url("scan")
    upload(str(tmp_path / "small"), storage.join(base, "archive"))
    upload(str(root / "references"), storage.join(base, "references"))
    options = ScanOptions(input=storage.join(base, "archive"), output=storage.join(base, "out"),
                          references=storage.join(base, "references"), threshold=1.5, max_pixels=MAX_PIXELS,
                          shard_size=16)
    summary = run_scan(load_config(None, CONFIG), options, progress=False)
    assert summary["seen"] == len(small.keys()) and summary["reconciles"]
    assert summary["scored"] == 120 and summary["skipped"] == len(small.bad)
    assert summary["calibration"]["categories"]["brick"] == {
        "category": "brick", "threshold": 1.5, "source": "fixed", "normals": 0, "empirical_fpr": None,
        "normal_median": None}
    assert summary["thresholds"]["brick"] == {"threshold": 1.5, "source": "fixed",
                                              "origin": "--threshold (every category)"}
    store = ScanStore(options.output)
    rows = store.read_table("results").to_pylist()
    assert len({r["source"] for r in rows}) == 120
    assert all(r["flag"] == (r["score"] > 1.5) for r in rows)
    assert "s3_server" not in str(summary) and "testing-secret" not in str(summary)


def test_scan_of_a_parquet_split_with_parquet_references(local_ray, tmp_path):
    from tests.workflows.pipelines.tiny_data import write_tiny

    data = write_tiny(str(tmp_path / "data"), corrupt=1)
    options = ScanOptions(input=data, output=str(tmp_path / "out"), references=data, split="test",
                          category="brick", threshold=0.5, shard_size=4)
    summary = run_scan(load_config(None, CONFIG), options, progress=False)
    # textures/brick test split: 3 normal + 3 anomalous + 1 truncated PNG (labels are ignored)
    assert (summary["seen"], summary["scored"], summary["skipped"]) == (7, 6, 1) and summary["reconciles"]
    store = ScanStore(options.output)
    rows = store.read_table("results").to_pylist()
    assert {r["dataset"] for r in rows} == {"textures"} and len({r["image_id"] for r in rows}) == 6
    (skipped,) = store.read_table("skipped").to_pylist()
    assert skipped["source"] == "corrupt/0.png" and "truncated" in skipped["reason"]


def test_per_category_thresholds_from_a_file_and_an_earlier_scan_and_overlays_survive_resume(
        local_scan, local_ray, tmp_path):
    """brick from the file (so high nothing is flagged), grass from the earlier scan's calibration; then
    a shard whose commit marker was lost (and one of its overlays) is rescored on rerun: the overlays
    come back under the same names, none twice."""
    earlier, _, _ = local_scan
    small = write_archive(str(tmp_path / "small"), per_category=40, seed=4, bad=False)
    (tmp_path / "thresholds.yaml").write_text("brick: 1.0e+6\n")
    options = ScanOptions(input=small.root, output=str(tmp_path / "out"),
                          references=earlier["options"]["references"],
                          thresholds_file=str(tmp_path / "thresholds.yaml"),
                          thresholds_from=earlier["options"]["output"], max_pixels=MAX_PIXELS, shard_size=8)
    summary = run_scan(load_config(None, CONFIG), options, progress=False)
    grass = earlier["calibration"]["categories"]["grass"]["threshold"]
    assert summary["thresholds"]["brick"]["source"] == "file"
    assert summary["thresholds"]["brick"]["origin"] == f"--thresholds {tmp_path / 'thresholds.yaml'}"
    assert summary["thresholds"]["grass"] == {"threshold": grass, "source": "run",
                                              "origin": f"--thresholds-from {options.thresholds_from}"}
    assert summary["calibration"]["normals_url"] is None  # nothing left to calibrate: no normals scored
    store = ScanStore(options.output)
    rows = store.read_table("results").to_pylist()
    assert {r["category"] for r in rows} == {"brick", "grass"}
    assert not any(r["flag"] for r in rows if r["category"] == "brick")
    assert all(r["flag"] == (r["score"] > grass) for r in rows if r["category"] == "grass")
    assert summary["per_category"]["grass"]["flagged"] >= 2  # the pasted defects
    overlays = {m["overlay"]: m["source"] for m in store.read_table("maps").to_pylist()}
    assert overlay_files(store) == set(overlays)
    assert sorted(overlays.values()) == sorted(r["source"] for r in rows if r["flag"])

    # a crash after the shard's overlays but before its marker; one overlay was not written either
    shard_id = next(m["shard_id"] for m in store.markers() if m["overlays"])
    lost = next(path for path in overlays if path in {m["overlay"] for m in store.read_parquet(
        store.table_url("maps", "grass", shard_id)).to_pylist()})
    storage.remove(storage.join(store.url, lost))
    storage.remove(store.done_url(shard_id))
    storage.remove(storage.join(store.url, "_SUCCESS"))
    again = run_scan(load_config(None, CONFIG), options, progress=False)
    assert again["this_run"]["shards_scored"] == 1 and again["flagged"] == summary["flagged"]
    assert overlay_files(store) == set(overlays)  # restored, nothing duplicated
    assert {m["overlay"] for m in store.read_table("maps").to_pylist()} == set(overlays)
