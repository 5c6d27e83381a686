"""`build_bench`: generate every benchmark category and write it as one residual-ad dataset."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from workflows.bench.config import BenchConfig
from workflows.bench.manifest import MANIFEST_PATH, bench_manifest, dataset_metadata, leak_figures
from workflows.bench.sources import DATASETS, PHOTO_CATEGORIES
from workflows.bench.synthetic import Sample


@dataclass
class CategoryBuild:
    dataset: str
    category: str
    samples: list[Sample]
    section: dict[str, Any]


@dataclass
class BenchSummary:
    dest_url: str
    seed: int
    scale: str
    rows: int
    write_id: str
    manifest_url: str
    categories: dict[str, dict[str, Any]] = field(default_factory=dict)  # "dataset/category" -> figures


def selected_datasets(config: BenchConfig) -> list[str]:
    names = list(DATASETS) if config.datasets is None else list(config.datasets)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown bench dataset(s) {unknown}: choose from {', '.join(DATASETS)}")
    return names


def iter_category_builds(config: BenchConfig) -> Iterator[CategoryBuild]:
    """Category by category, so that a full-scale build holds one category's images at a time."""
    from workflows.bench.elpv import CATEGORIES as ELPV_CATEGORIES
    from workflows.bench.elpv import build_elpv_category, read_labels
    from workflows.bench.synthetic import build_category

    names = selected_datasets(config)
    for category in PHOTO_CATEGORIES:
        if category.dataset in names:
            samples, section = build_category(category, config.sizes, config.seed)
            yield CategoryBuild(category.dataset, category.name, samples, section)
    if "elpv" in names:
        cells = read_labels()
        for name in ELPV_CATEGORIES:
            samples, section = build_elpv_category(name, cells, config.sizes, config.seed,
                                                   config.elpv_uncertain)
            yield CategoryBuild("elpv", name, samples, section)


def _dataset_sections(names: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in names:
        info = DATASETS[name]
        categories = [c.name for c in PHOTO_CATEGORIES if c.dataset == name] or ["mono", "poly"]
        out[name] = {"source_group": info.source_group, "description": info.description,
                     "categories": categories, "pixel_masks": name != "elpv",
                     "defects": "real" if name == "elpv" else "synthetic"}
    return out


def build_bench(dest_url: str, config: BenchConfig = BenchConfig(), *,
                progress=None) -> BenchSummary:
    """Generate the benchmark and write it under ``dest_url`` (local path, file:// or s3://).

    The rows stream into the dataset writer category by category; the full manifest (with every
    sample's provenance) is written to ``<dest_url>/_bench/manifest.json`` once the data is committed
    and names the dataset write it belongs to. ``progress(text)`` is called per finished category."""
    from workflows import storage
    from workflows.datasets import write_dataset

    names = selected_datasets(config)
    datasets = _dataset_sections(names)
    records: list[dict[str, Any]] = []
    sections: dict[str, dict[str, Any]] = {}

    def rows() -> Iterator[dict]:
        for build in iter_category_builds(config):
            category_records = [s.record for s in build.samples]
            records.extend(category_records)
            sections[f"{build.dataset}/{build.category}"] = {**build.section,
                                                             "leak_check": leak_figures(category_records)}
            for sample in build.samples:
                yield sample.row
            if progress is not None:
                progress(f"{build.dataset}/{build.category}: {len(build.samples)} images")

    report = write_dataset(rows(), dest_url,
                           extra_metadata=dataset_metadata(datasets, seed=config.seed, scale=config.scale),
                           pixel_ground_truth=lambda dataset, _category: datasets[dataset]["pixel_masks"])
    if report.duplicates:
        raise RuntimeError(f"bench generator produced duplicate images: {report.duplicates[:3]}")
    manifest_url = storage.join(dest_url, MANIFEST_PATH)
    storage.atomic_write_json(manifest_url, bench_manifest(
        seed=config.seed, scale=config.scale,
        options={"elpv_uncertain": config.elpv_uncertain, "datasets": names},
        datasets=datasets, categories=sections, samples=records, write_id=report.write_id))
    figures = {key: {**sec["leak_check"], **({"counts": sec["counts"]} if "counts" in sec else {})}
               for key, sec in sections.items()}
    return BenchSummary(dest_url=storage.redact(dest_url), seed=config.seed, scale=config.scale,
                        rows=report.rows_written, write_id=report.write_id,
                        manifest_url=storage.redact(manifest_url), categories=figures)
