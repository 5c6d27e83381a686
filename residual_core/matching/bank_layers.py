"""Matching against one layer of a ReferenceBank (the glue methods use)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from residual_core import faiss_index
from residual_core.matching.engine import (
    DEFAULT_CANDIDATES,
    MatchResult,
    ReferenceSet,
    match,
    prepare_reference,
)
from residual_core.matching.strategy import MatchStrategy

if TYPE_CHECKING:  # bank.py imports this package; keep the import one-way at run time
    from residual_core.bank import ReferenceBank


def bank_reference(
    bank: ReferenceBank, layer: int, *, pooling: bool = False, device: torch.device | str | None = None
) -> ReferenceSet:
    """Layer `layer` (position in bank.header.layers) as a normalised ReferenceSet on `device`."""
    if not 0 <= layer < len(bank.features):
        raise IndexError(f"bank has {len(bank.features)} layers, asked for layer position {layer}")
    features, positions = bank.features[layer], bank.positions[layer]
    if device is not None:
        features, positions = features.to(device), positions.to(device)
    return prepare_reference(features, positions, bank.grids[layer], pooling=pooling)


def match_bank_layer(
    tokens: torch.Tensor,
    bank: ReferenceBank,
    layer: int,
    strategy: MatchStrategy,
    *,
    grid: tuple[int, int] | None = None,
    path: str = "torch",
    reference: ReferenceSet | None = None,
    candidates: int = DEFAULT_CANDIDATES,
) -> MatchResult:
    """L2-normalise raw query `tokens` [B, L, D] (as Res2CLIP does) and match them to bank layer `layer`.

    Pass a cached `reference` (from `bank_reference`) to avoid re-normalising the bank per call. On the
    FAISS path the bank's own index is used unless the strategy pools (then one is built on the fly).
    """
    reference = reference or bank_reference(bank, layer, pooling=strategy.pooling, device=tokens.device)
    index = None
    if path == "faiss" and not strategy.pooling:
        index = bank.ensure_indexes()[layer]
    return match(
        faiss_index.normalise_rows(tokens.float()),
        reference,
        strategy,
        query_grid=grid or bank.grids[layer],
        path=path,
        index=index,
        candidates=candidates,
    )
