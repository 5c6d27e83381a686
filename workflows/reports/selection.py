"""Which images a gallery shows, chosen while streaming per-image results shard by shard.

Groups: the highest-scoring normals (would-be false alarms), the lowest-scoring anomalies (would-be
misses), and typical normals / anomalies (closest to their class's median score). Memory is bounded:
the extremes are kept exactly; the medians come from a deterministic pool (the ``pool_size`` images
with the smallest hash of their id), so the choice does not depend on shard order or size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

HIGH_NORMALS = "highest-scoring normals"
LOW_ANOMALIES = "lowest-scoring anomalies"
TYPICAL_NORMALS = "typical normals"
TYPICAL_ANOMALIES = "typical anomalies"
GROUPS = (HIGH_NORMALS, LOW_ANOMALIES, TYPICAL_NORMALS, TYPICAL_ANOMALIES)


@dataclass(frozen=True)
class Candidate:
    """One scored, labelled image that the gallery could show."""

    image_id: str
    label: int
    score: float
    shard_id: str
    defect_type: str | None = None
    source: str | None = None  # where the image came from (a readable name for captions)


def _hash(image_id: str) -> bytes:
    return hashlib.blake2b(image_id.encode(), digest_size=8).digest()


@dataclass
class GallerySelector:
    """Feed candidates with ``add``; ``select()`` gives {group: [Candidate, ...]} (empty groups kept)."""

    per_group: int = 4
    pool_size: int = 4096
    seen: int = 0
    _high_normals: list[Candidate] = field(default_factory=list)
    _low_anomalies: list[Candidate] = field(default_factory=list)
    _pools: dict[int, list[tuple[bytes, Candidate]]] = field(default_factory=lambda: {0: [], 1: []})

    def __post_init__(self) -> None:
        if self.per_group < 1 or self.pool_size < 1:
            raise ValueError(f"per_group and pool_size must be >= 1, got {self.per_group}, {self.pool_size}")

    def add(self, candidates: list[Candidate]) -> None:
        self.seen += len(candidates)
        normals = [c for c in candidates if c.label == 0]
        anomalies = [c for c in candidates if c.label == 1]
        self._high_normals = sorted(self._high_normals + normals,
                                    key=lambda c: (-c.score, c.image_id))[: self.per_group]
        self._low_anomalies = sorted(self._low_anomalies + anomalies,
                                     key=lambda c: (c.score, c.image_id))[: self.per_group]
        for label, members in ((0, normals), (1, anomalies)):
            pool = self._pools[label] + [(_hash(c.image_id), c) for c in members]
            self._pools[label] = sorted(pool, key=lambda item: (item[0], item[1].image_id))[: self.pool_size]

    def _typical(self, label: int, taken: set[str]) -> list[Candidate]:
        pool = [c for _, c in self._pools[label] if c.image_id not in taken]
        if not pool:
            return []
        median = float(np.median([c.score for _, c in self._pools[label]]))
        closest = sorted(pool, key=lambda c: (abs(c.score - median), c.image_id))[: self.per_group]
        return sorted(closest, key=lambda c: (c.score, c.image_id))

    def select(self) -> dict[str, list[Candidate]]:
        taken = {c.image_id for c in self._high_normals + self._low_anomalies}
        return {
            HIGH_NORMALS: list(self._high_normals),
            LOW_ANOMALIES: list(self._low_anomalies),
            TYPICAL_NORMALS: self._typical(0, taken),
            TYPICAL_ANOMALIES: self._typical(1, taken),
        }


def candidates_from_table(table, shard_id: str, with_maps: set[str] | None = None) -> list[Candidate]:
    """Scored, labelled, finite-score rows of a per-image results table (``with_maps``: only those ids)."""
    columns = table.to_pydict()
    missing = [None] * table.num_rows
    statuses = columns.get("status") or ["scored"] * table.num_rows
    out = []
    for image_id, label, score, status, defect, source in zip(
            columns["image_id"], columns["label"], columns["image_score"], statuses,
            columns.get("defect_type") or missing, columns.get("source") or missing, strict=True):
        if status != "scored" or label not in (0, 1) or score is None or not np.isfinite(score):
            continue
        if with_maps is not None and image_id not in with_maps:
            continue
        out.append(Candidate(image_id, int(label), float(score), shard_id, defect, source))
    return out
