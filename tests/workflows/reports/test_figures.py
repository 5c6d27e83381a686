"""Curve and gallery figures from small synthetic inputs: valid PNGs, PRO only with masks, overlays on
one colour scale with the defect outlined."""

from __future__ import annotations

import numpy as np
from PIL import Image

from residual_core.metrics import MetricAccumulator
from workflows.reports.curves import describe_counts, write_category_curves
from workflows.reports.gallery import GalleryTile, compose_tile, outline, plot_gallery, shared_map_range


def _accumulator(with_masks: bool) -> MetricAccumulator:
    rng = np.random.default_rng(0)
    labels = np.array([0] * 5 + [1] * 5)
    masks = np.zeros((10, 12, 12), bool)
    masks[5:, 3:7, 4:8] = True
    maps = (rng.normal(size=masks.shape) + 2 * masks).astype(np.float32)
    acc = MetricAccumulator()
    if with_masks:
        acc.update(maps.reshape(10, -1).max(1), labels, maps, masks)
    else:
        acc.update(maps.reshape(10, -1).max(1), labels)
    return acc


def _png_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_curves_with_masks_give_roc_and_pro(tmp_path):
    files = write_category_curves(_accumulator(True), "textures/brick · baseline k=1 seed=0", str(tmp_path),
                                  "brick")
    assert files.missing == {}
    assert files.roc_png.endswith("brick_roc.png") and files.pro_png.endswith("brick_pro.png")
    for path in (files.roc_png, files.pro_png):
        width, height = _png_size(path)
        assert 300 < width < 1200 and 300 < height < 1200


def test_curves_without_masks_give_no_pixel_or_pro_curve_and_say_why(tmp_path):
    files = write_category_curves(_accumulator(False), "elpv/mono", str(tmp_path), "mono")
    assert files.pro_png is None and not (tmp_path / "mono_pro.png").exists()
    _png_size(files.roc_png)
    assert set(files.missing) == {"pixel ROC", "PRO"}
    assert all("ground-truth mask" in reason for reason in files.missing.values())
    counts = {"images": 10, "normal_images": 5, "anomalous_images": 5, "regions": 0}
    assert describe_counts(counts) == "10 images: 5 normal, 5 anomalous"


def test_overlay_tiles_share_one_scale_and_outline_the_defect():
    image = np.full((20, 20, 3), 100, np.uint8)
    low = GalleryTile(image, np.zeros((20, 20), np.float32), None, "low")
    mask = np.zeros((20, 20), bool)
    mask[5:15, 5:15] = True
    high_map = np.zeros((20, 20), np.float32)
    high_map[5:15, 5:15] = 1.0
    high = GalleryTile(image, high_map, mask, "high")
    limits = shared_map_range([low, high])
    assert limits == (0.0, 1.0)
    low_rgb, high_rgb = compose_tile(low, limits, 40), compose_tile(high, limits, 40)
    # a zero map barely tints the image; a high score is strongly coloured (jet: red end)
    assert np.abs(low_rgb - 100 / 255).max() < 0.1
    assert high_rgb[20, 20, 0] - high_rgb[20, 20, 2] > 0.25
    edge = outline(mask)
    assert edge.sum() == 36 and not edge[10, 10] and edge[5, 10]
    assert np.allclose(high_rgb[10, 20], 1.0)  # the outline (white) on the scaled-up mask's border
    assert shared_map_range([GalleryTile(image, None, None, "x")]) is None


def test_gallery_png_with_missing_groups_and_unreadable_originals(tmp_path):
    image = np.zeros((16, 16, 3), np.uint8)
    rows = [("highest-scoring normals", [GalleryTile(image, np.ones((16, 16)), None, "a\nscore 1")] * 3),
            ("lowest-scoring anomalies", []),
            ("typical normals", [GalleryTile(None, np.zeros((16, 16)), None, "b"),
                                 GalleryTile(None, None, None, "c")])]
    path = plot_gallery(rows, "Anomaly maps — x/y", str(tmp_path / "g" / "y.png"), ["a note"])
    width, height = _png_size(path)
    assert width > height > 200
