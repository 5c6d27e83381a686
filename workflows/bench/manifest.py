"""The benchmark's manifest: per dataset its source group, per category how it was split and how
well trivial statistics separate its test images, per sample where it came from."""

from __future__ import annotations

from typing import Any

import numpy as np

MANIFEST_PATH = "_bench/manifest.json"
MANIFEST_FORMAT = "residual-ad-bench"
MANIFEST_VERSION = 1


def rank_auroc(scores: list[float], labels: list[int]) -> float | None:
    """Image AUROC of one score (Mann-Whitney U with average ranks); None without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(labels)
    positives, negatives = int((y == 1).sum()), int((y == 0).sum())
    if positives == 0 or negatives == 0:
        return None
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def leak_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """AUROC of encoded size alone and of mean intensity alone over a category's test samples."""
    test = [r for r in records if r["split"] == "test" and r["label"] in (0, 1)]
    labels = [r["label"] for r in test]
    size = rank_auroc([r["encoded_bytes"] for r in test], labels)
    mean = rank_auroc([r["mean_intensity"] for r in test], labels)
    return {"auroc_encoded_size": None if size is None else round(size, 4),
            "auroc_mean_intensity": None if mean is None else round(mean, 4),
            "test_normal": labels.count(0), "test_anomalous": labels.count(1)}


def dataset_metadata(datasets: dict[str, dict[str, Any]], *, seed: int, scale: str) -> dict[str, Any]:
    """What goes into the dataset manifest's ``extra`` object (the writer's ``extra_metadata``):
    ``source_groups`` (dataset -> group; leave-one-dataset-out never trains on the held-out dataset's
    group) and a ``bench`` summary pointing at the full manifest."""
    return {
        "source_groups": {name: info["source_group"] for name, info in datasets.items()},
        "bench": {"generator": "residual-ad build-bench", "seed": seed, "scale": scale,
                  "manifest": MANIFEST_PATH, "note": "synthetic defects on real photos (and real ELPV cells)",
                  "datasets": datasets},
    }


def bench_manifest(*, seed: int, scale: str, options: dict[str, Any], datasets: dict[str, dict[str, Any]],
                   categories: dict[str, dict[str, Any]], samples: list[dict[str, Any]],
                   write_id: str) -> dict[str, Any]:
    """The full manifest written beside the data at ``MANIFEST_PATH``."""
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "seed": seed, "scale": scale,
            "options": options, "dataset_write_id": write_id, "datasets": datasets,
            "categories": categories, "samples": samples}
