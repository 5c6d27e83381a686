"""Anomaly maps of the few images a gallery shows: the job's stored maps where it kept them, else the
same maps recomputed on the driver (`pipelines.local_scoring`) with the model, bank, preset and, for
set-normalised methods, the per-category constants the job committed.

Recomputing needs the job's scoring setup (`metrics.json` `scoring_job`, written by evaluate); a job
committed before it was recorded gets stored maps only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from workflows import storage
from workflows.pipelines.commits import ShardStore
from workflows.pipelines.shards import Shard, read_shard
from workflows.reports import job_outputs

STORED = "stored"
RECOMPUTED = "recomputed"


def scoring_job(job_url: str):
    """The job's `ScoringJob` from its metrics.json; None when the job did not record it."""
    from workflows.pipelines.scoring import ScoringJob

    url = storage.join(job_url, "metrics.json")
    if not storage.exists(url):
        return None
    record = storage.read_json(url).get("scoring_job")
    return ScoringJob(**record) if record else None


def set_record(job_url: str, dataset: str, category: str) -> dict | None:
    """The category's reduce record (normaliser and statistics), when the job's method needed one."""
    url = ShardStore(job_url).reduced_url(dataset, category)
    return storage.read_json(url) if storage.exists(url) else None


def recompute_maps(scorer, job_url: str, shard: Shard, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """Maps (float32 [S, S]) of `image_ids` of one shard, computed as the evaluate pipeline did: the
    images decoded and preprocessed as `prepare_shard` does, scored by `scorer` (a `LocalScorer` of the
    job) against the category's committed bank, finished with the category's stored constants."""
    from residual_core.images import decode_image

    job = scorer.job
    name = f"{shard.dataset}/{shard.category}"
    record = set_record(job_url, shard.dataset, shard.category)
    if scorer.method.set_normaliser() is not None and record is None:
        raise ValueError(f"{name}: the method needs the category's set constants and the job has none")
    wanted = set(image_ids)
    table = read_shard(shard, columns=("image_id", "image"))
    rows = [r for r in table.to_pylist() if r["image_id"] in wanted]
    images = scorer.prepare([decode_image(r["image"]) for r in rows])
    out = scorer.score(images, scorer.load_bank(job.banks[name]), set_record=record)
    return {r["image_id"]: out.maps[i] for i, r in enumerate(rows)}


@dataclass
class ShownMaps:
    """Maps of a gallery's images and where each came from (image id -> STORED | RECOMPUTED)."""

    maps: dict[str, np.ndarray] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # why some maps could not be recomputed


def gallery_maps(job_url: str, shards: dict[str, Shard], chosen: dict[str, list[str]],
                 scorers: dict | None = None) -> ShownMaps:
    """Maps of the chosen image ids per shard id: stored ones read, the rest recomputed (one shard at a
    time, only those images). `scorers`: a cache (job URL -> `LocalScorer`) shared by the categories of
    a report, so the model is loaded once."""
    shown = ShownMaps()
    scorers = {} if scorers is None else scorers
    job, scorer = scoring_job(job_url), scorers.get(job_url)
    for shard_id, ids in sorted(chosen.items()):
        stored = job_outputs.stored_map_ids(job_url, shard_id) & set(ids)
        if stored:
            shown.maps.update(job_outputs.load_maps(job_url, shard_id, stored))
            shown.sources.update(dict.fromkeys(stored, STORED))
        missing = [i for i in ids if i not in stored]
        if not missing:
            continue
        if job is None:
            shown.problems.append("the job did not record its scoring setup (evaluated by an older version)")
            continue
        try:
            if scorer is None:
                from workflows.pipelines.local_scoring import LocalScorer

                scorer = scorers[job_url] = LocalScorer(job)
            maps = recompute_maps(scorer, job_url, shards[shard_id], missing)
        except Exception as exc:  # noqa: BLE001 - a gallery without some maps still helps
            problem = storage.redact(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"gallery: maps of shard {shard_id} not recomputed ({problem})", stacklevel=2)
            shown.problems.append(problem)
            continue
        shown.maps.update(maps)
        shown.sources.update(dict.fromkeys(maps, RECOMPUTED))
    shown.problems = list(dict.fromkeys(shown.problems))
    return shown
