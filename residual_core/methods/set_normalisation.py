"""Anomaly maps that need statistics of the whole evaluated set of a category.

ResAD++'s authors (validate.py) normalise each feature level's log-likelihoods by their maximum over
every test image of the category before merging; no single batch can do that. A method that offers
such a normalisation returns a `SetNormaliser` from `AnomalyMethod.set_normaliser()`, and scoring runs
in two phases:
1. `method.score_raw(images, bank) -> RawBatch`: per-image intermediate arrays, batch-first and small
   (feature resolution), which a pipeline can store per shard;
2. once every image of the category is scored: `stats = normaliser.statistics(batches)` (it may pass
   over the stored batches several times: `batches()` starts a new pass), then
   `normaliser.finish(raw, stats) -> ScoreOutput` per batch gives the final maps and scores.
A normaliser is a plain value: `to_dict()` / `normaliser_from_dict()` rebuild it without the model, so
a reduce step needs neither the backbone nor the method's weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Protocol

from torch import Tensor

from residual_core.methods.base import MethodError, ScoreOutput

RawBatch = dict[str, Tensor]  # name -> [B, ...] arrays of one batch
BatchSource = Callable[[], Iterable[RawBatch]]  # each call starts a new pass over every batch


class SetNormaliser(Protocol):
    kind: ClassVar[str]

    def statistics(self, batches: BatchSource) -> dict[str, Any]:
        """JSON-serialisable statistics of the whole set (e.g. per-level maxima)."""

    def finish(self, raw: RawBatch, stats: dict[str, Any]) -> ScoreOutput:
        """Final maps and scores of one batch, given the set's statistics."""

    def to_dict(self) -> dict[str, Any]:
        """`{"kind": ..., **fields}`; `normaliser_from_dict` inverts it."""


_KINDS: dict[str, Callable[..., SetNormaliser]] = {}


def register_normaliser(cls):
    """Class decorator: make `cls` (with a `kind` class attribute) rebuildable from its dict."""
    _KINDS[cls.kind] = cls
    return cls


def normaliser_from_dict(data: dict[str, Any]) -> SetNormaliser:
    from residual_core.methods.registry import available_methods

    available_methods()  # importing the built-in methods registers their normalisers
    fields = dict(data)
    kind = fields.pop("kind", None)
    if kind not in _KINDS:
        raise MethodError(f"unknown set normaliser {kind!r}; known: {sorted(_KINDS)}")
    return _KINDS[kind](**fields)
