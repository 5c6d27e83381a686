"""Residual matching: Res2CLIP's strategy family and ResAD's nearest-neighbour matching.

`parse_strategy` reads the authors' strategy strings; `prepare_reference` + `match` run a strategy on
either execution path ("torch" brute force or "faiss" candidates + exact re-rank); `bank_reference`
takes a layer from a ReferenceBank; `resad` holds ResAD's matching and residuals.
"""

from residual_core.matching.bank_layers import bank_reference, match_bank_layer
from residual_core.matching.engine import (
    MatchResult,
    ReferenceSet,
    match,
    match_per_sample,
    prepare_reference,
)
from residual_core.matching.penalties import grid_positions, spatial_penalty
from residual_core.matching.strategy import DEFAULT_STRATEGY, MatchStrategy, parse_strategy
from residual_core.matching.weighting import sparsemax, topk_softmax

__all__ = [
    "DEFAULT_STRATEGY",
    "MatchResult",
    "MatchStrategy",
    "ReferenceSet",
    "bank_reference",
    "grid_positions",
    "match",
    "match_bank_layer",
    "match_per_sample",
    "parse_strategy",
    "prepare_reference",
    "sparsemax",
    "spatial_penalty",
    "topk_softmax",
]
