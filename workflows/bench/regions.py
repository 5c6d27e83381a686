"""Disjoint reference/test regions of one photo and the crops sampled inside them.

A photo is cut into a grid of square tiles separated by at least ``gap`` pixels; tiles are
assigned to ``train`` or ``test`` in a checkerboard (so both splits see every part of the scene)
and every crop lies inside one tile, so no reference crop ever shares a pixel with a test crop
and the two are at least ``gap`` pixels apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), source pixels


@dataclass(frozen=True)
class Tile:
    row: int
    col: int
    box: Box
    split: str


@dataclass(frozen=True)
class CropSpec:
    box: Box
    rot90: int  # counter-clockwise quarter turns applied after cropping
    hflip: bool

    def describe(self) -> str:
        parts = ([f"rot{90 * self.rot90}"] if self.rot90 else []) + (["hflip"] if self.hflip else [])
        return "+".join(parts) or "none"


def _positions(extent: int, tile_px: int, gap: int) -> list[int]:
    count = (extent + gap) // (tile_px + gap)
    if count < 1:
        return []
    if count == 1:
        return [(extent - tile_px) // 2]
    step = (extent - tile_px) / (count - 1)  # >= tile_px + gap by the choice of count
    return [int(round(i * step)) for i in range(count)]


def tile_grid(width: int, height: int, tile_px: int, gap: int, rng: np.random.Generator) -> list[Tile]:
    """Checkerboard of train/test tiles; which colour is ``train`` is drawn from ``rng``."""
    xs, ys = _positions(width, tile_px, gap), _positions(height, tile_px, gap)
    if len(xs) * len(ys) < 2:
        raise ValueError(f"a {width}x{height} photo has room for fewer than 2 tiles of {tile_px} px")
    train_parity = int(rng.integers(2))
    return [
        Tile(r, c, (x, y, x + tile_px, y + tile_px), "train" if (r + c) % 2 == train_parity else "test")
        for r, y in enumerate(ys)
        for c, x in enumerate(xs)
    ]


def min_gap(a: Box, b: Box) -> int:
    """Chebyshev gap between two boxes in pixels (negative when they overlap)."""
    dx = max(a[0] - b[2], b[0] - a[2])
    dy = max(a[1] - b[3], b[1] - a[3])
    return max(dx, dy)


def sample_crops(tiles: list[Tile], count: int, crop_px: int, augment: str,
                 rng: np.random.Generator) -> list[CropSpec]:
    """``count`` crops spread round-robin over ``tiles`` (shuffled), at random offsets inside them."""
    if not tiles:
        raise ValueError("no tiles to crop from")
    order = [tiles[i] for i in rng.permutation(len(tiles))]
    room = min(t.box[2] - t.box[0] for t in tiles) - crop_px
    if room < 0:
        raise ValueError(f"crops of {crop_px} px do not fit into tiles of {crop_px + room} px")
    distinct = len(tiles) * (room + 1) ** 2 * 2 * (4 if augment == "dihedral" else 1)
    if count > distinct:
        raise ValueError(f"{count} distinct crops requested but the tiles allow only {distinct}")
    crops: list[CropSpec] = []
    seen: set[CropSpec] = set()
    while len(crops) < count:
        x0, y0 = order[len(crops) % len(order)].box[:2]
        dx, dy = (int(v) for v in rng.integers(0, room + 1, size=2))
        rot = int(rng.integers(4)) if augment == "dihedral" else 0
        crop = CropSpec((x0 + dx, y0 + dy, x0 + dx + crop_px, y0 + dy + crop_px), rot, bool(rng.integers(2)))
        if crop not in seen:  # never the same crop twice (identical images)
            seen.add(crop)
            crops.append(crop)
    return crops


def cut(pixels: np.ndarray, crop: CropSpec) -> np.ndarray:
    """The crop's pixels [h, w, C] with its rotation and flip applied (a contiguous copy)."""
    x0, y0, x1, y1 = crop.box
    out = pixels[y0:y1, x0:x1]
    if crop.rot90:
        out = np.rot90(out, crop.rot90, axes=(0, 1))
    if crop.hflip:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)
