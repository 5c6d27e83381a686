"""Train and test regions of a photo never overlap and stay >= 16 px apart."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from workflows.bench.config import SPLIT_GAP_PX
from workflows.bench.regions import CropSpec, cut, min_gap, sample_crops, tile_grid


@pytest.mark.parametrize("size", [(512, 512), (640, 427), (600, 400)])
def test_tiles_are_a_checkerboard_with_gaps(size):
    tiles = tile_grid(*size, tile_px=160, gap=SPLIT_GAP_PX, rng=np.random.default_rng(0))
    assert {t.split for t in tiles} == {"train", "test"}
    for a, b in itertools.combinations(tiles, 2):
        assert min_gap(a.box, b.box) >= SPLIT_GAP_PX
    for t in tiles:
        assert 0 <= t.box[0] < t.box[2] <= size[0] and 0 <= t.box[1] < t.box[3] <= size[1]


def test_crops_stay_inside_their_split_tiles():
    rng = np.random.default_rng(1)
    tiles = tile_grid(512, 512, tile_px=160, gap=SPLIT_GAP_PX, rng=rng)
    train = sample_crops([t for t in tiles if t.split == "train"], 12, 128, "dihedral", rng)
    test = sample_crops([t for t in tiles if t.split == "test"], 20, 128, "dihedral", rng)
    for a, b in itertools.product(train, test):
        assert min_gap(a.box, b.box) >= SPLIT_GAP_PX


def test_photo_too_small_for_two_tiles_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than 2 tiles"):
        tile_grid(200, 200, tile_px=160, gap=SPLIT_GAP_PX, rng=np.random.default_rng(0))


def test_cut_applies_rotation_and_flip():
    pixels = np.arange(4 * 4 * 1, dtype=np.uint8).reshape(4, 4, 1)
    crop = cut(pixels, CropSpec((0, 0, 2, 2), rot90=0, hflip=True))
    assert crop[:, :, 0].tolist() == [[1, 0], [5, 4]]
    assert cut(pixels, CropSpec((0, 0, 2, 2), rot90=1, hflip=False)).shape == (2, 2, 1)
