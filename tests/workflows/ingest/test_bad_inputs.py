"""Every bad input of the issue is quarantined by path and reason; counts reconcile; --strict fails."""

from __future__ import annotations

import json
import os

import pytest

from tests.workflows.ingest.trees import (
    SIZE,
    build_defect_tree,
    build_visa_tree,
    image_bytes,
    mask_bytes,
    put,
)
from workflows.cli import main
from workflows.datasets import DatasetNotFoundError, read_manifest, read_table
from workflows.ingest import IngestOptions, StrictIngestError, ingest


def _bad_mvtec_tree(root, outside):
    build_defect_tree(root, categories=("bottle",))
    bottle = root / "bottle"
    good_test = bottle / "test" / "good"
    put(bottle / "test" / "crack" / "trunc.png", image_bytes(900)[:40])
    put(bottle / "ground_truth" / "crack" / "trunc_mask.png", mask_bytes(900))
    put(bottle / "test" / "crack" / "wrongsize.png", image_bytes(901))
    wider = (SIZE[0] + 4, SIZE[1])
    put(bottle / "ground_truth" / "crack" / "wrongsize_mask.png", mask_bytes(901, size=wider))
    put(good_test / "normal_with_mask.png", image_bytes(902))
    put(bottle / "ground_truth" / "good" / "normal_with_mask_mask.png", mask_bytes(902))
    put(bottle / "test" / "scratch" / "nomask.png", image_bytes(903))
    put(good_test / "notes.txt", b"not an image at all")
    put(good_test / "zero.png", b"")
    put(good_test / "copy.png", (good_test / "000.png").read_bytes())
    put(outside / "secret.png", image_bytes(904))
    (good_test / "escape.png").symlink_to(outside / "secret.png")
    os.mkfifo(good_test / "pipe.png")  # reading it would block for ever
    (root / "empty_cat" / "train" / "good").mkdir(parents=True)
    put(bottle / "ground_truth" / "crack" / "orphan_mask.png", mask_bytes(905))


EXPECTED_REASONS = {
    "bottle/test/crack/trunc.png": "truncated",
    "bottle/test/crack/wrongsize.png": "differs from image size",
    "bottle/test/good/normal_with_mask.png": "mask present for a normal image",
    "bottle/test/good/notes.txt": "not an image",
    "bottle/test/good/zero.png": "empty file",
    "bottle/test/good/copy.png": "duplicate image",
    "bottle/test/good/escape.png": "escapes the source tree",
    "bottle/test/good/pipe.png": "not a regular file: a FIFO",
}


def test_every_bad_input_is_quarantined_and_counts_reconcile(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _bad_mvtec_tree(src, tmp_path / "outside")
    result = ingest(str(src), str(out), IngestOptions(layout="mvtec", progress=False))
    report = result.report
    reasons = {p.path: p.reason for p in report.quarantined}
    assert set(reasons) == set(EXPECTED_REASONS)
    for path, fragment in EXPECTED_REASONS.items():
        assert fragment in reasons[path], (path, reasons[path])
    assert [w.path for w in report.warnings] == ["bottle/test/scratch/nomask.png"]
    other = {p.path: p.reason for p in report.other_problems}
    assert "empty category" in other["empty_cat"]
    assert "without a matching image" in other["bottle/ground_truth/crack/orphan_mask.png"]
    # the valid rest is written; the anomalous image without a mask is kept with a null mask
    table = read_table(str(out))
    assert report.seen == report.written + len(report.quarantined) == 9 + 1 + len(EXPECTED_REASONS)
    assert table.num_rows == report.written == 10
    kept = table.filter(table["source"].to_numpy(zero_copy_only=False) == "bottle/test/scratch/nomask.png")
    assert kept.num_rows == 1 and kept["mask"][0].as_py() is None and kept["label"][0].as_py() == 1
    saved = json.loads((out / "_quarantine" / "mvtec.json").read_text())
    assert saved["counts"]["reconciles"] is True
    assert saved["counts"]["quarantined"] == len(EXPECTED_REASONS)
    assert read_manifest(str(out))["extra"]["ingest:mvtec"]["written"] == 10


def test_visa_csv_path_escaping_the_tree_is_quarantined(tmp_path):
    src = tmp_path / "src"
    build_visa_tree(src)
    put(tmp_path / "outside.png", image_bytes(950))
    with (src / "split_csv" / "1cls.csv").open("a") as handle:
        handle.write("candle,test,anomaly,../outside.png,\n")
        handle.write("candle,test,maybe,candle/Data/Images/Normal/000.png,\n")
    report = ingest(str(src), str(tmp_path / "out"), IngestOptions(layout="visa", progress=False)).report
    reasons = sorted(p.reason for p in report.quarantined)
    assert len(reasons) == 2
    assert any("escapes the source tree" in r for r in reasons)
    assert any("bad CSV row" in r for r in reasons)
    assert report.reconciles and report.written == 10


def test_strict_fails_and_commits_nothing(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _bad_mvtec_tree(src, tmp_path / "outside")
    with pytest.raises(StrictIngestError):
        ingest(str(src), str(out), IngestOptions(layout="mvtec", strict=True, progress=False))
    with pytest.raises(DatasetNotFoundError):
        read_table(str(out))
    assert (out / "_quarantine" / "mvtec.json").exists()
    assert main(["ingest", "--format", "mvtec", "--strict", "--no-progress", str(src), str(out)]) == 2


def test_cli_ingest_and_summary(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    _bad_mvtec_tree(src, tmp_path / "outside")
    assert main(["ingest", "--format", "mvtec", "--no-progress", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "seen 18 images = written 10 + quarantined 8" in printed
    assert "quarantine report:" in printed
    assert main(["summary", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "bottle" in summary and "TOTAL" in summary
    assert main(["summary", "--json", str(out)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert sum(r["rows"] for r in rows) == 10
    assert {(r["split"], r["normal"], r["anomalous"]) for r in rows} == {("train", 3, 0), ("test", 2, 5)}
    assert main(["summary", str(tmp_path / "nothing")]) == 1


def test_missing_or_empty_source_is_a_clear_error(tmp_path, capsys):
    out = str(tmp_path / "o")
    assert main(["ingest", "--format", "mvtec", "--no-progress", str(tmp_path / "nope"), out]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["ingest", "--format", "btad", "--no-progress", str(tmp_path / "empty"), out]) == 1
    assert "no categories found" in capsys.readouterr().err
