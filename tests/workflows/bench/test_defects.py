"""Each defect kind changes pixels visibly inside its mask, within the area bounds."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from workflows.bench.config import MAX_DEFECT_AREA, MIN_DEFECT_AREA
from workflows.bench.defects import DEFECT_KINDS, composite, render_defect
from workflows.bench.regions import CropSpec, Tile
from workflows.bench.sources import PHOTO_CATEGORIES
from workflows.bench.synthetic import MIN_VISIBLE_CHANGE, render_defective

CANVAS = np.ascontiguousarray(data.coffee()[100:228, 200:328])  # real photo, 128 px


@pytest.mark.parametrize("kind", DEFECT_KINDS)
@pytest.mark.parametrize("polarity", ["dark", "bright"])
def test_every_kind_gives_a_valid_layer(kind, polarity):
    donor = np.ascontiguousarray(data.coffee()[250:378, 50:178])
    layer = render_defect(kind, CANVAS, area=0.03, polarity=polarity, px_scale=1.0,
                          rng=np.random.default_rng(3), donor=donor)
    assert layer.alpha.shape == CANVAS.shape[:2] and layer.alpha.dtype == np.float32
    assert 0.0 <= layer.alpha.min() and layer.alpha.max() <= 1.0
    assert (layer.alpha >= 0.5).mean() > 0.001
    out = composite(CANVAS, layer)
    assert out.shape == CANVAS.shape and out.dtype == np.uint8
    outside = layer.alpha == 0
    assert np.array_equal(out[outside], CANVAS[outside])  # nothing changes where opacity is 0


def test_unknown_kind_and_missing_donor_are_clear_errors():
    with pytest.raises(ValueError, match="unknown defect kind 'dent'"):
        render_defect("dent", CANVAS, area=0.01, polarity="dark", px_scale=1.0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="cut_paste needs a donor"):
        render_defect("cut_paste", CANVAS, area=0.01, polarity="dark", px_scale=1.0,
                      rng=np.random.default_rng(0))


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_rendered_defects_respect_area_and_visibility(kind):
    category = next(c for c in PHOTO_CATEGORIES if c.name == "coffee")
    photo = data.coffee()
    tiles = [Tile(0, 0, (0, 0, 160, 160), "test"), Tile(0, 1, (176, 0, 336, 160), "test")]
    crop = CropSpec((10, 10, 138, 138), 0, False)
    clean = np.ascontiguousarray(photo[10:138, 10:138])
    for seed in range(4):
        out = render_defective(category, photo, clean, tiles, crop, kind, "dark", 128, sample_seed=seed)
        assert MIN_DEFECT_AREA <= out.area <= MAX_DEFECT_AREA
        assert out.params["mean_change"] >= MIN_VISIBLE_CHANGE
        assert out.mask is not None and (out.width, out.height) == (128, 128)
