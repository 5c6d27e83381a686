"""Which test crops become defective: matched pairs, balanced so trivial statistics stay blind.

Every defect adds or removes some detail and shifts brightness a little, so picking defective
crops at random lets encoded size or mean intensity alone separate normal from defective images
in small categories. Instead, test crops are paired by their clean statistics, both members of a
pair get the same planned defect (kind, polarity), and for each pair the member that becomes
defective is chosen, pair by pair in random order, to keep the two groups' statistics balanced
(the "minimisation" used to balance arms of small clinical trials).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workflows.bench.defects import DEFECT_KINDS, POLARITIES


@dataclass(frozen=True)
class ImageStats:
    encoded_bytes: int
    mean_intensity: float


def stats_of(encoded: bytes, pixels: np.ndarray) -> ImageStats:
    return ImageStats(len(encoded), float(np.asarray(pixels, dtype=np.float64).mean()))


def pair_by_stats(stats: list[ImageStats]) -> list[tuple[int, int]]:
    """Neighbours in the order of (rank of mean intensity + rank of encoded size)."""
    if len(stats) % 2:
        raise ValueError(f"pairing needs an even number of test crops, got {len(stats)}")
    means = np.array([s.mean_intensity for s in stats])
    sizes = np.array([s.encoded_bytes for s in stats], dtype=np.float64)
    score = np.argsort(np.argsort(means)) + np.argsort(np.argsort(sizes)) + np.arange(len(stats)) * 1e-6
    order = np.argsort(score, kind="stable")
    return [(int(order[i]), int(order[i + 1])) for i in range(0, len(order), 2)]


def defect_plan(count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(kind, polarity) per pair: kinds round-robin; dark/bright balanced and alternating per kind."""
    kinds = len(DEFECT_KINDS)
    plan = [(DEFECT_KINDS[i % kinds], POLARITIES[(i % kinds + i // kinds) % 2]) for i in range(count)]
    return [plan[i] for i in rng.permutation(count)]


def _features(stats: list[ImageStats], scale_from: list[ImageStats]) -> np.ndarray:
    """Standardised (log size, mean intensity) with the spread of ``scale_from``."""
    def raw(items: list[ImageStats]) -> np.ndarray:
        return np.array([[np.log(s.encoded_bytes), s.mean_intensity] for s in items])

    ref = raw(scale_from)
    return (raw(stats) - ref.mean(axis=0)) / (ref.std(axis=0) + 1e-9)


def choose_defective(pairs: list[tuple[int, int]], clean: list[ImageStats], damaged: list[ImageStats],
                     rng: np.random.Generator) -> set[int]:
    """For each pair pick the member that gets its defect, minimising the running imbalance
    (sum over defective of damaged features minus sum over normal of clean features)."""
    clean_f, damaged_f = _features(clean, clean), _features(damaged, clean)
    imbalance = np.zeros(2)
    chosen = set()
    for p in rng.permutation(len(pairs)):
        a, b = pairs[p]
        options = [(a, b), (b, a)]  # (defective, normal)
        costs = [np.abs(imbalance + damaged_f[d] - clean_f[n]).sum() for d, n in options]
        pick = int(rng.integers(2)) if np.isclose(costs[0], costs[1]) else int(np.argmin(costs))
        defective, normal = options[pick]
        imbalance += damaged_f[defective] - clean_f[normal]
        chosen.add(defective)
    return chosen
