"""A small build: datasets, splits, masks, provenance and source groups."""

from __future__ import annotations

import collections
import io
import itertools

import numpy as np
from PIL import Image

from tests.workflows.bench.helpers import bench_manifest, decode, rows
from workflows import storage
from workflows.bench.config import MAX_DEFECT_AREA, MIN_DEFECT_AREA, SCALES, SPLIT_GAP_PX
from workflows.bench.regions import min_gap

SMALL = SCALES["small"]


def test_every_category_has_its_splits_and_counts(small_bench):
    url, summary = small_bench
    counts = collections.Counter((r["dataset"], r["category"], r["split"], r["label"]) for r in rows(url))
    categories = {(d, c) for d, c, _, _ in counts}
    assert {d for d, _ in categories} == {"textures", "photos", "elpv"}
    for dataset in ("textures", "photos"):
        assert len([c for d, c in categories if d == dataset]) >= 3
    for dataset, category in categories:
        assert counts[(dataset, category, "train", 0)] == SMALL.train_per_category
        assert counts[(dataset, category, "test", 0)] == SMALL.test_normal_per_category
        assert counts[(dataset, category, "test", 1)] == SMALL.test_defective_per_category
        assert counts[(dataset, category, "train", 1)] == 0
    assert summary.rows == sum(counts.values())


def test_masks_match_their_images_and_cover_the_allowed_area(small_bench):
    url, _ = small_bench
    kinds = collections.defaultdict(set)
    for row in rows(url):
        image = decode(row["image"])
        assert image.shape[:2] == (row["height"], row["width"]) == (128, 128)
        if row["dataset"] == "elpv" or row["label"] == 0:
            assert row["mask"] is None
            assert row["defect_type"] in ("good", "defective")
            continue
        with Image.open(io.BytesIO(row["mask"])) as mask_img:
            mask = np.asarray(mask_img) > 0
        assert mask.shape == image.shape[:2]
        assert MIN_DEFECT_AREA <= mask.mean() <= MAX_DEFECT_AREA
        kinds[row["dataset"]].add(row["defect_type"])
    for dataset in ("textures", "photos"):
        assert len(kinds[dataset]) >= 4, kinds


def test_manifest_records_provenance_of_every_sample(small_bench):
    url, _ = small_bench
    manifest = bench_manifest(url)
    by_id = {s["image_id"]: s for s in manifest["samples"]}
    data = rows(url)
    assert len(by_id) == len(data)
    for row in data:
        record = by_id[row["image_id"]]
        assert (record["dataset"], record["category"], record["split"], record["label"]) == \
            (row["dataset"], row["category"], row["split"], row["label"])
        assert record["source"] == row["source"] and isinstance(record["sample_seed"], int)
        if row["dataset"] != "elpv":
            assert len(record["crop_box"]) == 4
        if row["label"] == 1 and row["dataset"] != "elpv":
            assert record["defect_type"] == row["defect_type"]
            assert MIN_DEFECT_AREA <= record["defect_area"] <= MAX_DEFECT_AREA
    for key, section in manifest["categories"].items():
        assert section["split_method"], key
    assert manifest["dataset_write_id"]


def test_reference_and_test_crops_are_disjoint_regions(small_bench):
    url, _ = small_bench
    samples = bench_manifest(url)["samples"]
    groups = collections.defaultdict(lambda: {"train": [], "test": []})
    for s in samples:
        if s["crop_box"] is not None:
            groups[(s["dataset"], s["category"])][s["split"]].append(s["crop_box"])
    assert groups
    for key, boxes in groups.items():
        for a, b in itertools.product(boxes["train"], boxes["test"]):
            assert min_gap(tuple(a), tuple(b)) >= SPLIT_GAP_PX, key


def test_datasets_have_disjoint_photos_categories_and_their_own_source_groups(small_bench):
    url, _ = small_bench
    data = rows(url)
    sources = collections.defaultdict(set)
    categories = collections.defaultdict(set)
    for row in data:
        sources[row["dataset"]].add(row["source"])
        categories[row["dataset"]].add(row["category"])
    for a, b in itertools.combinations(sources, 2):
        assert not sources[a] & sources[b]
        assert not categories[a] & categories[b]
    extra = storage.read_json(storage.join(url, "_manifest.json"))["extra"]
    groups = extra["source_groups"]
    assert set(groups) == {"textures", "photos", "elpv"}
    assert len(set(groups.values())) == 3
    assert extra["bench"]["manifest"] == "_bench/manifest.json"


def test_elpv_references_are_normal_cells_outside_the_test_split(small_bench):
    url, _ = small_bench
    samples = [s for s in bench_manifest(url)["samples"] if s["dataset"] == "elpv"]
    for category in ("mono", "poly"):
        mine = [s for s in samples if s["category"] == category]
        train = {s["source"] for s in mine if s["split"] == "train"}
        test = {s["source"] for s in mine if s["split"] == "test"}
        assert train and test and not train & test
        assert all(s["elpv_probability"] == 0 for s in mine if s["split"] == "train" or s["label"] == 0)
        assert all(s["elpv_probability"] == 1 for s in mine if s["label"] == 1)
