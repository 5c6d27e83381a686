"""Every layout on a small generated tree: counts, labels, categories, and each mask on its own image."""

from __future__ import annotations

from collections import Counter

import pytest

from residual_core.images import decode_mask
from tests.workflows.ingest.trees import (
    build_defect_tree,
    build_folder_tree,
    build_typed_folder_tree,
    build_visa_tree,
    index_of,
    mask_pixels,
)
from workflows.datasets import read_table
from workflows.ingest import IngestOptions, ingest


def _ingest(src, dest, layout, **kwargs):
    return ingest(str(src), str(dest), IngestOptions(layout=layout, progress=False, workers=2, **kwargs))


def _counts(table):
    return Counter(zip(table["category"].to_pylist(), table["split"].to_pylist(), table["label"].to_pylist(),
                       strict=True))


def _assert_masks_on_their_images(table):
    with_mask = [r for r in table.to_pylist() if r["mask"] is not None]
    assert with_mask
    for row in with_mask:
        assert row["label"] == 1
        mask = decode_mask(row["mask"], (row["width"], row["height"]))
        assert mask.sum() == mask_pixels(index_of(row["image"]))


@pytest.mark.parametrize(("layout", "normal", "anomalous", "suffix"), [
    ("mvtec", "good", ("crack", "scratch"), "_mask"),
    ("mpdd", "good", ("hole",), "_mask"),
    ("btad", "ok", ("ko",), ""),
])
def test_defect_tree_layouts(tmp_path, layout, normal, anomalous, suffix):
    build_defect_tree(tmp_path / "src", normal=normal, anomalous=anomalous, mask_suffix=suffix)
    result = _ingest(tmp_path / "src", tmp_path / "out", layout)
    table = read_table(str(tmp_path / "out"))
    n_anom = 2 * len(anomalous)
    for category in ("bottle", "wood"):
        assert _counts(table)[(category, "train", 0)] == 3
        assert _counts(table)[(category, "test", 0)] == 2
        assert _counts(table)[(category, "test", 1)] == n_anom
    assert set(table["dataset"].to_pylist()) == {layout}
    assert set(table.filter(table["label"].to_numpy() == 1)["defect_type"].to_pylist()) == set(anomalous)
    assert set(table.filter(table["label"].to_numpy() == 0)["defect_type"].to_pylist()) == {"good"}
    _assert_masks_on_their_images(table)
    assert result.report.seen == result.report.written == table.num_rows
    assert not result.report.quarantined and not result.report.warnings


def test_visa_layout(tmp_path):
    build_visa_tree(tmp_path / "src")
    result = _ingest(tmp_path / "src", tmp_path / "out", "visa")
    table = read_table(str(tmp_path / "out"))
    counts = _counts(table)
    for category in ("candle", "pcb1"):
        assert counts[(category, "train", 0)] == 2
        assert counts[(category, "test", 0)] == 1
        assert counts[(category, "test", 1)] == 2
    _assert_masks_on_their_images(table)
    assert result.report.written == 10 and result.report.reconciles


def test_visa_defect_types_come_from_the_category_annotations(tmp_path):
    """``<category>/image_anno.csv`` names each anomaly's defects; a category without it has none."""
    build_visa_tree(tmp_path / "src")
    lines = ["image,label,mask", "candle/Data/Images/Normal/000.png,normal,",
             "candle/Data/Images/Anomaly/000.png,bent,candle/Data/Masks/Anomaly/000.png",
             'candle/Data/Images/Anomaly/001.png,"melt, scratch",candle/Data/Masks/Anomaly/001.png']
    (tmp_path / "src" / "candle" / "image_anno.csv").write_text("\n".join(lines) + "\n")
    result = _ingest(tmp_path / "src", tmp_path / "out", "visa")
    rows = read_table(str(tmp_path / "out")).to_pylist()
    types = {r["source"]: r["defect_type"] for r in rows if r["label"] == 1}
    assert types == {"candle/Data/Images/Anomaly/000.png": "bent",
                     "candle/Data/Images/Anomaly/001.png": "melt,scratch",
                     "pcb1/Data/Images/Anomaly/000.png": None, "pcb1/Data/Images/Anomaly/001.png": None}
    assert {r["defect_type"] for r in rows if r["label"] == 0} == {"good"}
    assert result.report.written == 10 and not result.report.other_problems


@pytest.mark.parametrize("same_names", [False, True])
def test_folder_layout_and_default_dataset_name(tmp_path, same_names):
    build_folder_tree(tmp_path / "my-set", same_names=same_names)
    result = _ingest(tmp_path / "my-set", tmp_path / "out", "folder")
    table = read_table(str(tmp_path / "out"))
    counts = _counts(table)
    for category in ("tile", "leather"):
        assert counts[(category, "train", 0)] == 2
        assert counts[(category, "test", 0)] == 2
        assert counts[(category, "test", 1)] == 2
        assert counts[(category, "unlabeled", None)] == 2
    assert set(table["dataset"].to_pylist()) == {"my-set"}
    _assert_masks_on_their_images(table)
    assert result.report.written == 16


def test_folder_layout_with_defect_types(tmp_path):
    """``anomalous/<type>/`` gives the defect type; masks pair from ``masks/<type>/`` (stems repeat
    across types), then from ``masks/``; flat ``anomalous/*`` stays defect type ``anomalous``."""
    expected = build_typed_folder_tree(tmp_path / "src")
    result = _ingest(tmp_path / "src", tmp_path / "out", "folder")
    table = read_table(str(tmp_path / "out"))
    rows = table.to_pylist()
    anomalous = {r["source"]: r for r in rows if r["label"] == 1}
    assert {source: r["defect_type"] for source, r in anomalous.items()} == expected
    assert all(r["mask"] is not None and r["split"] == "test" for r in anomalous.values())
    _assert_masks_on_their_images(table)
    normal = [r for r in rows if r["label"] == 0]
    assert {(r["split"], r["defect_type"]) for r in normal} == {("train", "good"), ("test", "good")}
    assert all(r["mask"] is None for r in normal)
    assert result.report.written == len(expected) + 2 and not result.report.quarantined
    (problem,) = result.report.other_problems
    assert problem.path == "tile/masks/stray"
    assert problem.reason == "mask folder without a matching anomalous/stray folder"


def test_reingest_replaces_without_duplicates(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    build_defect_tree(src)
    _ingest(src, out, "mvtec")
    _ingest(src, out, "mvtec")
    assert read_table(str(out)).num_rows == 2 * (3 + 2 + 4)
    (src / "bottle" / "train" / "good" / "000.png").unlink()
    _ingest(src, out, "mvtec")
    table = read_table(str(out))
    assert table.num_rows == 2 * (3 + 2 + 4) - 1
    keys = list(zip(table["image_id"].to_pylist(), table["split"].to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    # a second dataset in the same destination leaves the first untouched
    build_folder_tree(tmp_path / "extra")
    _ingest(tmp_path / "extra", out, "folder")
    assert read_table(str(out), filters=[("dataset", "==", "mvtec")]).num_rows == table.num_rows


def test_any_image_mode_is_accepted_and_kept_as_original_bytes(tmp_path):
    from residual_core.images import decode_image
    from tests.workflows.ingest.trees import image_bytes, put

    originals = {f"{mode.replace(';', '_')}.png": image_bytes(40 + i, mode=mode)
                 for i, mode in enumerate(("L", "RGBA", "P", "LA", "I;16", "1"))}
    for name, data in originals.items():
        put(tmp_path / "src" / "modes" / "normal" / name, data)
    result = _ingest(tmp_path / "src", tmp_path / "out", "folder")
    assert result.report.written == len(originals), result.report.quarantined
    for row in read_table(str(tmp_path / "out")).to_pylist():
        assert row["image"] == originals[row["source"].rsplit("/", 1)[-1]]
        assert decode_image(row["image"]).mode == "RGB"
