"""Res2CLIP matching-strategy strings and their parsed form.

Format (the authors' `get_visual_match`): ``["sparse_"] <penalty> "_" <K> "nn"`` where the
"sparse_" prefix selects sparsemax weighting, <penalty> names a spatial penalty (empty for none) and
<K> is a neighbour count or the letter "k" (use `k_neighbors`). Examples: "sparse_radial_knn" (their
default), "2nn", "radial_3nn", "polar_linear_2nn", "1nn".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PENALTY_KINDS = (
    "",
    "local",
    "radial",
    "radial_new",
    "radial_margin",
    "radial_laplace",
    "polar_linear",
    "polar",
    "radial_euc",
    "euc_new",
)
WEIGHTINGS = ("sparsemax", "softmax", "nearest")

DEFAULT_STRATEGY = "sparse_radial_knn"
DEFAULT_SPATIAL_PENALTY = 0.01
DEFAULT_K_NEIGHBORS = 5
DEFAULT_TEMPERATURE = 0.05

_SUFFIX = re.compile(r"_?([kK]|\d+)nn$")


@dataclass(frozen=True)
class MatchStrategy:
    """A parsed strategy.

    weighting: "sparsemax" (over all references), "softmax" (over the top-k, temperature-scaled
    true similarities) or "nearest" (1-NN). penalty: one of PENALTY_KINDS, scaled by
    spatial_penalty (gamma). pooling: 3x3 average-pooled addressing (search on the mean of pooled
    and plain similarities).
    """

    weighting: str = "sparsemax"
    penalty: str = "radial"
    k_neighbors: int = DEFAULT_K_NEIGHBORS
    spatial_penalty: float = DEFAULT_SPATIAL_PENALTY
    temperature: float = DEFAULT_TEMPERATURE
    pooling: bool = False

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting {self.weighting!r} is not one of {WEIGHTINGS}")
        if self.penalty not in PENALTY_KINDS:
            valid = ", ".join(kind for kind in PENALTY_KINDS if kind)
            raise ValueError(f"unknown spatial penalty {self.penalty!r}; valid: {valid} (or none)")
        if self.k_neighbors < 1:
            raise ValueError(f"k_neighbors must be >= 1, got {self.k_neighbors}")
        if self.temperature <= 0:
            raise ValueError(f"softmax temperature must be > 0, got {self.temperature}")

    @property
    def has_penalty(self) -> bool:
        return bool(self.penalty) and self.spatial_penalty != 0.0


def parse_strategy(
    text: str = DEFAULT_STRATEGY,
    *,
    spatial_penalty: float = DEFAULT_SPATIAL_PENALTY,
    k_neighbors: int = DEFAULT_K_NEIGHBORS,
    temperature: float = DEFAULT_TEMPERATURE,
    pooling: bool = False,
    use_sparse: bool = False,
) -> MatchStrategy:
    """Parse a strategy string exactly as the authors do (see module docstring).

    `use_sparse` forces sparsemax whatever the prefix (their redundant `--use_sparse` flag).
    """
    body = text
    if body.startswith("sparse_"):
        use_sparse = True
        body = body[len("sparse_") :]
    match = _SUFFIX.search(body)
    if not match:
        raise ValueError(f"invalid match strategy {text!r}: must end with 'Xnn' or 'knn'")
    if match.group(1).lower() != "k":
        k_neighbors = int(match.group(1))
    if k_neighbors < 1:
        raise ValueError(f"invalid match strategy {text!r}: k_neighbors must be >= 1, got {k_neighbors}")
    if use_sparse:
        weighting = "sparsemax"
    else:
        weighting = "softmax" if k_neighbors > 1 else "nearest"
    return MatchStrategy(
        weighting=weighting,
        penalty=body[: match.start()],
        k_neighbors=k_neighbors,
        spatial_penalty=spatial_penalty,
        temperature=temperature,
        pooling=pooling,
    )
