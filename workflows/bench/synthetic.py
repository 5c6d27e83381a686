"""One photo category of the benchmark: reference crops, normal test crops, defective test crops.

References come from the photo's train tiles, test crops from its test tiles (see `regions`).
Every test crop is rendered clean and with its pair's planned defect, all through the one
resize + encode path; `balance` then decides which member of each pair is the defective sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from workflows.bench.balance import ImageStats, choose_defective, defect_plan, pair_by_stats, stats_of
from workflows.bench.config import MAX_DEFECT_AREA, MIN_DEFECT_AREA, SPLIT_GAP_PX, BenchScale
from workflows.bench.defects import composite, render_defect
from workflows.bench.encoding import derive_seed, finish_image, finish_mask, rng_for
from workflows.bench.regions import CropSpec, Tile, cut, sample_crops, tile_grid
from workflows.bench.sources import BenchCategory, load_photo
from workflows.datasets.schema import content_id

#: target mask area ranges per kind (fractions of the image); the result is checked against
#: [MIN_DEFECT_AREA, MAX_DEFECT_AREA] and redrawn when outside
AREA_RANGES: dict[str, tuple[float, float]] = {
    "scratch": (0.004, 0.02),
    "stain": (0.01, 0.06),
    "cut_paste": (0.008, 0.06),
    "spot": (0.003, 0.025),
    "smudge": (0.01, 0.06),
}
MAX_DRAWS = 12
#: a defect must change the pixels under its mask by at least this much on average (grey levels)
MIN_VISIBLE_CHANGE = 12.0
#: a kind that cannot be made visible on a crop (e.g. a smudge on clear sky) gives way to another
FALLBACK_KIND = {"smudge": "stain", "cut_paste": "spot", "stain": "spot", "scratch": "spot"}


@dataclass
class Sample:
    row: dict[str, Any]  # a dataset row (schema columns)
    record: dict[str, Any]  # its manifest entry


@dataclass
class Rendered:
    """One crop through the shared output path, clean or damaged."""

    data: bytes
    width: int
    height: int
    stats: ImageStats
    kind: str = "good"
    mask: bytes | None = None
    area: float | None = None
    params: dict | None = None


def _render(pixels: np.ndarray, output_px: int | None, **defect: Any) -> Rendered:
    data, img = finish_image(pixels, output_px)
    return Rendered(data, img.width, img.height, stats_of(data, np.asarray(img)), **defect)


def _donor(tiles: list[Tile], crop: CropSpec, crop_px: int, augment: str,
           rng: np.random.Generator) -> CropSpec:
    """A crop of another test tile (another place of the photo) to cut a patch from."""
    x, y = crop.box[:2]
    others = [t for t in tiles if not (t.box[0] <= x < t.box[2] and t.box[1] <= y < t.box[3])]
    return sample_crops(others or tiles, 1, crop_px, augment, rng)[0]


def _visible_change(clean: np.ndarray, damaged: np.ndarray, alpha: np.ndarray) -> float:
    """Mean absolute change (grey levels, averaged over channels) where the opacity is >= 0.5."""
    inside = alpha >= 0.5
    if not inside.any():
        return 0.0
    diff = np.abs(damaged.astype(np.float32) - clean.astype(np.float32)).mean(axis=2)
    return float(diff[inside].mean())


def render_defective(category: BenchCategory, pixels: np.ndarray, clean: np.ndarray, test_tiles: list[Tile],
                     crop: CropSpec, kind: str, polarity: str, output_px: int | None,
                     sample_seed: int) -> Rendered:
    """Paint a defect of ``kind`` onto the clean crop (before resizing) and render it; redraws until
    the mask area is within bounds and the change is visible, then falls back to another kind."""
    rng = np.random.default_rng(sample_seed)
    px_scale = 1.0 if output_px is None else category.crop_px / output_px
    donor_spec = _donor(test_tiles, crop, category.crop_px, category.augment, rng)
    donor = cut(pixels, donor_spec)
    for draw in range(2 * MAX_DRAWS):
        if draw == MAX_DRAWS and kind in FALLBACK_KIND:
            kind = FALLBACK_KIND[kind]
        low, high = AREA_RANGES[kind]
        target = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        layer = render_defect(kind, clean, area=target, polarity=polarity, px_scale=px_scale, rng=rng,
                              donor=donor)
        mask, mask_png = finish_mask(layer.alpha, output_px)
        area = float(mask.mean())
        damaged = composite(clean, layer)
        change = _visible_change(clean, damaged, layer.alpha)
        if MIN_DEFECT_AREA <= area <= MAX_DEFECT_AREA and change >= MIN_VISIBLE_CHANGE:
            params = {"planned": polarity, **layer.params, "mean_change": round(change, 1)}
            if kind == "cut_paste":
                params.update(donor_box=list(donor_spec.box), donor_transform=donor_spec.describe())
            return _render(damaged, output_px, kind=kind, mask=mask_png, area=area, params=params)
    raise RuntimeError(f"{category.dataset}/{category.name}: no visible {kind} defect within the area "
                       f"bounds after {2 * MAX_DRAWS} draws (sample seed {sample_seed})")


def build_category(category: BenchCategory, sizes: BenchScale, seed: int) -> tuple[list[Sample], dict]:
    """All samples of one category (train, then test in crop order) and its manifest section."""
    if sizes.test_normal_per_category != sizes.test_defective_per_category:
        raise ValueError("pairing needs as many normal as defective test samples per category")
    pixels = load_photo(category.photo)
    height, width = pixels.shape[:2]
    key = (category.dataset, category.name)
    tile_px = category.crop_px + category.crop_px // 4
    tiles = tile_grid(width, height, tile_px, SPLIT_GAP_PX, rng_for(seed, *key, "tiles"))
    train_tiles = [t for t in tiles if t.split == "train"]
    test_tiles = [t for t in tiles if t.split == "test"]
    n_pairs = sizes.test_defective_per_category
    train_crops = sample_crops(train_tiles, sizes.train_per_category, category.crop_px, category.augment,
                               rng_for(seed, *key, "train-crops"))
    test_crops = sample_crops(test_tiles, 2 * n_pairs, category.crop_px, category.augment,
                              rng_for(seed, *key, "test-crops"))

    def meta(crop: CropSpec, split: str, index: int) -> dict[str, Any]:
        return {"dataset": category.dataset, "category": category.name, "split": split,
                "source": category.photo.source, "crop_box": list(crop.box), "transform": crop.describe(),
                "sample_seed": derive_seed(seed, *key, split, index)}

    samples = [make_sample(meta(crop, "train", i), _render(cut(pixels, crop), sizes.output_px))
               for i, crop in enumerate(train_crops)]

    test_meta = [meta(crop, "test", i) for i, crop in enumerate(test_crops)]
    clean_pixels = [cut(pixels, crop) for crop in test_crops]
    clean = [_render(p, sizes.output_px) for p in clean_pixels]
    pairs = pair_by_stats([r.stats for r in clean])
    plan = defect_plan(n_pairs, rng_for(seed, *key, "plan"))
    damaged: list[Rendered] = [None] * len(test_crops)  # type: ignore[list-item]
    for (a, b), (kind, polarity) in zip(pairs, plan, strict=True):
        for i in (a, b):
            damaged[i] = render_defective(category, pixels, clean_pixels[i], test_tiles, test_crops[i], kind,
                                          polarity, sizes.output_px, test_meta[i]["sample_seed"])
    defective = choose_defective(pairs, [r.stats for r in clean], [r.stats for r in damaged],
                                 rng_for(seed, *key, "balance"))
    samples += [make_sample(meta_i, damaged[i] if i in defective else clean[i])
                for i, meta_i in enumerate(test_meta)]

    section = {
        "source": category.photo.source, "license": category.photo.license,
        "photo_size": [width, height], "crop_px": category.crop_px, "output_px": sizes.output_px,
        "augment": category.augment,
        "split_method": (
            f"checkerboard of {tile_px}px tiles at least {SPLIT_GAP_PX}px apart; train crops lie inside "
            "train tiles, test crops inside test tiles; defects painted onto test crops after cropping; "
            "the defective member of each stats-matched pair of test crops chosen by minimisation"),
        "tiles": [{"box": list(t.box), "split": t.split} for t in tiles],
        "counts": {"train": len(train_crops), "test_normal": len(test_crops) - len(defective),
                   "test_defective": len(defective)},
    }
    return samples, section


def make_sample(meta: dict, rendered: Rendered) -> Sample:
    label = 0 if rendered.mask is None else 1
    row = {"image_id": content_id(rendered.data), "dataset": meta["dataset"], "category": meta["category"],
           "split": meta["split"], "label": label, "defect_type": rendered.kind, "image": rendered.data,
           "mask": rendered.mask, "width": rendered.width, "height": rendered.height,
           "source": meta["source"]}
    record = {**meta, "image_id": row["image_id"], "label": label, "defect_type": rendered.kind,
              "defect_area": None if rendered.area is None else round(rendered.area, 5),
              "encoded_bytes": rendered.stats.encoded_bytes,
              "mean_intensity": round(rendered.stats.mean_intensity, 3),
              "defect": rendered.params}
    return Sample(row, record)
