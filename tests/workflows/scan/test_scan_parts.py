"""Scan building blocks without Ray: regions, heat maps, calibration and archive planning."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from workflows.pipelines.calibration import Calibration, calibrate, threshold_at_fpr
from workflows.pipelines.raw_images import NO_CATEGORY, iter_archive, plan_archive, shard_keys
from workflows.pipelines.regions import heatmap_png, top_region


def test_top_region_finds_the_hot_component_in_original_coordinates():
    values = np.random.default_rng(0).random((32, 32)).astype(np.float32) * 0.1
    values[4:10, 20:28] = 1.0  # the defect
    values[25, 2] = 0.6  # a weaker, separate blob: not the top region
    region = top_region(values, (128, 64))  # original image is 128 wide, 64 high: 4x, 2x
    assert region.bbox() == [80, 8, 112, 20]
    assert region.area_fraction == pytest.approx(6 * 8 / 32**2)


def test_top_region_maps_back_through_a_centre_crop():
    """With the `resad` preset the map covers a centre crop: the box lands on the defect's original pixels."""
    from residual_core.preprocess import get_preprocess

    original = np.zeros((100, 200, 3), np.uint8)
    original[40:60, 110:130] = 255  # the defect: x 110..130, y 40..60
    image = Image.fromarray(original)
    preset, size = get_preprocess("resad"), 50
    seen = preset.display(image, size)[..., 0].astype(np.float32) / 255  # as an anomaly map
    view = preset.view(image.size, size).as_tuple()
    assert view == (50.0, 0.0, 100.0, 100.0)
    region = top_region(seen, image.size, view=view)
    assert all(abs(a - b) <= 2 for a, b in zip(region.bbox(), [110, 40, 130, 60], strict=True)), region
    assert region.area_fraction == pytest.approx((seen >= 0.5).mean() * 0.5)  # crop = half the image
    naive = top_region(seen, image.size)  # ignoring the crop puts the box elsewhere
    assert abs(naive.x1 - 130) >= 20  # [120, 40, 160, 60]: stretched over the whole width


def test_top_region_of_a_flat_map_is_the_whole_image_and_bad_maps_are_refused():
    assert top_region(np.zeros((8, 8)), (10, 10)).bbox() == [0, 0, 10, 10]
    with pytest.raises(ValueError, match="2-D"):
        top_region(np.zeros(5), (5, 5))


def test_heatmap_png_is_a_small_rgb_png_of_the_map_size():
    data = heatmap_png(np.linspace(0, 1, 48 * 40).reshape(40, 48))
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (48, 40) and image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels[0, 0, 2] > pixels[0, 0, 0] and pixels[-1, -1, 0] > pixels[-1, -1, 2]  # blue low, red high


def test_threshold_at_fpr_keeps_at_most_the_target_fraction_above():
    scores = np.arange(200, dtype=np.float64)  # 0..199
    threshold = threshold_at_fpr(scores, 0.01)
    assert threshold == 197.0 and (scores > threshold).mean() == pytest.approx(0.01)
    assert threshold_at_fpr(scores[:50], 0.01) == 49.0  # 0.5 allowed -> none above
    assert threshold_at_fpr(scores, 0.0) == 199.0
    with pytest.raises(ValueError, match="without any normal"):
        threshold_at_fpr([], 0.01)
    with pytest.raises(ValueError, match="target FPR"):
        threshold_at_fpr(scores, 1.5)


def test_calibration_records_each_category_and_round_trips():
    base = Calibration(0.05, None, "normals/", {"name": "baseline"}, {"spec": "effnet-lite0"})
    rng = np.random.default_rng(1)
    calibration = calibrate({"a": rng.random(100)}, ["a", "b"], target_fpr=0.05, base=base)
    assert calibration.categories["a"].source == "fpr" and calibration.categories["a"].empirical_fpr <= 0.05
    assert calibration.categories["b"].threshold is None and calibration.categories["b"].source == "none"
    again = Calibration.from_dict(json.loads(json.dumps(calibration.to_dict())))
    assert again.thresholds() == calibration.thresholds()


def _touch(root, rel, data=b"x"):
    path = root.joinpath(*rel.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_archive_listing_is_sorted_with_categories_from_the_first_level(tmp_path):
    for rel in ["b/2.png", "a/z/1.png", "a/0.png", "top.png", "b/1.png"]:
        _touch(tmp_path / "arc", rel)
    assert list(iter_archive(str(tmp_path / "arc"))) == [
        (NO_CATEGORY, "top.png"), ("a", "a/0.png"), ("a", "a/z/1.png"), ("b", "b/1.png"), ("b", "b/2.png")]
    assert {c for c, _ in iter_archive(str(tmp_path / "arc"), category="given")} == {"given"}
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list(iter_archive(str(tmp_path / "missing")))


def test_plan_cuts_per_category_shards_with_stable_ids(tmp_path):
    for i in range(5):
        _touch(tmp_path / "arc", f"a/{i}.png")
    _touch(tmp_path / "arc", "b/0.png")
    shards = list(plan_archive(str(tmp_path / "arc"), str(tmp_path / "plan"), shard_size=2))
    assert [(s.category, s.size) for s in shards] == [("a", 2), ("a", 2), ("a", 1), ("b", 1)]
    assert shard_keys(shards[1]) == ["a/2.png", "a/3.png"]
    again = list(plan_archive(str(tmp_path / "arc"), str(tmp_path / "plan2"), shard_size=2))
    assert [s.shard_id for s in again] == [s.shard_id for s in shards]
    with pytest.raises(ValueError, match="shard_size"):
        list(plan_archive(str(tmp_path / "arc"), str(tmp_path / "plan3"), shard_size=0))


def test_scan_cli_reads_the_limits_with_size_units():
    import argparse

    from workflows.commands.scan import _options, add_parser, byte_size
    from workflows.pipelines.scan import SCAN_MAX_PIXELS

    assert [byte_size(t) for t in ("1024", "64M", "256MiB", "1.5G", "2kb")] == [
        1024, 64 * 2**20, 256 * 2**20, 3 * 2**29, 2048]
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        byte_size("lots")
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["scan", "in", "--references", "refs", "-o", "out", "--threshold", "1"]
    defaults = _options(parser.parse_args(base))
    assert defaults.max_pixels == SCAN_MAX_PIXELS and defaults.max_bytes == 128 * 2**20
    assert defaults.read_timeout_s == 60
    assert not defaults.jpeg_draft and defaults.decode_memory is None
    given = _options(parser.parse_args([*base, "--max-bytes", "8M", "--read-timeout", "5", "--jpeg-draft",
                                        "--decode-memory", "0", "--max-pixels", "1000"]))
    assert (given.max_bytes, given.read_timeout_s, given.jpeg_draft) == (8 * 2**20, 5.0, True)
    assert (given.decode_memory, given.max_pixels) == (0, 1000)
