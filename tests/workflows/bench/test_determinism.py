"""Same seed -> byte-identical Parquet content; another seed -> other crops and defects."""

from __future__ import annotations

from tests.workflows.bench.helpers import bench_manifest, partition_file_bytes, rows
from workflows.bench import BenchConfig, build_bench


def test_same_seed_gives_identical_parquet_bytes(small_bench, tmp_path):
    url, _ = small_bench
    again = str(tmp_path / "again")
    build_bench(again, BenchConfig(seed=0, scale="small"))
    first, second = partition_file_bytes(url), partition_file_bytes(again)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key] == second[key], key
    assert bench_manifest(url)["samples"] == bench_manifest(again)["samples"]


def test_other_seed_gives_other_crops_and_defects(small_bench, tmp_path):
    url, _ = small_bench
    other = str(tmp_path / "seed1")
    build_bench(other, BenchConfig(seed=1, scale="small", datasets=("textures",)))
    textures = [r for r in rows(url) if r["dataset"] == "textures"]
    changed = rows(other)
    assert {r["image_id"] for r in changed}.isdisjoint({r["image_id"] for r in textures})
    boxes = {tuple(s["crop_box"]) for s in bench_manifest(url)["samples"] if s["dataset"] == "textures"}
    other_boxes = {tuple(s["crop_box"]) for s in bench_manifest(other)["samples"]}
    assert boxes != other_boxes
