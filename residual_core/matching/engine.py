"""Execution of a matching strategy: exact brute force in torch, or FAISS candidates + exact re-rank.

Both paths compute, per query patch q (L2-normalised) and references r_j (L2-normalised):
  sim_j    = q . r_j                                   (true similarity)
  search_j = sim_j, or (q_pool . r_pool_j + sim_j) / 2 (3x3 pooled addressing)
  ranked_j = search_j - penalty(pos_q, pos_j)
then weight the references (sparsemax of ranked, softmax(sim / T) of the top-k by ranked, or the
argmax of ranked), sum them, and L2-normalise: the matched reference m. The anomaly map is 1 - q . m.

The FAISS path retrieves the top-C references by `search` and re-ranks only those, exactly. Since
penalties are >= 0, no reference outside the candidates can beat the lowest retrieved search score
`s_C`; a row is certified exact when its decision is above `s_C` (1-NN / top-k: the k-th ranked
score; sparsemax: the threshold tau). Uncertified rows are retried with 8x the candidates and then
with brute force, so with an exact (flat) index both paths agree to float rounding. With IVF/HNSW the
top-C itself is approximate and so is the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import torch
import torch.nn.functional as F

from residual_core import faiss_index
from residual_core.matching import knn
from residual_core.matching.penalties import grid_positions, spatial_penalty
from residual_core.matching.strategy import MatchStrategy
from residual_core.matching.weighting import pruned_sparsemax_threshold, sparsemax, sparsemax_threshold

PATHS = ("torch", "faiss")
DEFAULT_CANDIDATES = 64
DEFAULT_MAX_ELEMENTS = 1 << 24  # bound on the elements of one [rows, refs] or [rows, C, D] block
CERTIFY_MARGIN = 1e-5  # slack for float differences between FAISS scores and the torch re-rank
_INVALID_SCORE = -1.0e6  # stands in for "no candidate" (approximate indexes return id -1)


@dataclass
class ReferenceSet:
    """One layer's references ready for matching.

    features: [N, D] L2-normalised. positions: [N, 2] (row, col) or None (no penalties possible).
    grid: (H, W) the positions refer to. pooled: [N, D] normalised 3x3-pooled features (pooling only).
    """

    features: torch.Tensor
    positions: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    pooled: torch.Tensor | None = None

    def search_vectors(self) -> torch.Tensor:
        """What a FAISS index for this set must hold: the features, or [pooled, features] for pooling."""
        return self.features if self.pooled is None else torch.cat([self.pooled, self.features], dim=1)


@dataclass
class MatchResult:
    """matched: [B, L, D] L2-normalised matched references. anomaly_map: [B, L] = 1 - q . matched.
    nearest: [B, L] reference index for 1-NN strategies (else None). fallback_rows: FAISS-path rows
    that needed brute force."""

    matched: torch.Tensor
    anomaly_map: torch.Tensor
    nearest: torch.Tensor | None = None
    fallback_rows: int = 0


def prepare_reference(
    features: torch.Tensor,
    positions: torch.Tensor | None = None,
    grid: tuple[int, int] | None = None,
    *,
    pooling: bool = False,
) -> ReferenceSet:
    """Normalise raw reference features [N, D] (and pool them per reference image when `pooling`)."""
    if features.ndim != 2:
        raise ValueError(f"reference features must be [N, D], got shape {tuple(features.shape)}")
    if positions is not None and positions.shape != (features.shape[0], 2):
        raise ValueError(
            f"reference positions must be [{features.shape[0]}, 2], got {tuple(positions.shape)}"
        )
    normalised = faiss_index.normalise_rows(features.float())
    pooled = None
    if pooling:
        if grid is None or positions is None:
            raise ValueError("pooled addressing needs the reference grid and positions")
        cells = grid[0] * grid[1]
        tiled = grid_positions(grid, device=positions.device).repeat(max(1, features.shape[0] // cells), 1)
        if features.shape[0] % cells or not torch.equal(positions, tiled):
            raise ValueError(
                "pooled addressing needs whole reference grids in row-major order "
                "(not a coreset-subsampled bank)"
            )
        pooled = pool_tokens(normalised.view(-1, cells, normalised.shape[1]), grid).reshape_as(normalised)
    return ReferenceSet(normalised, positions, grid, pooled)


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """3x3 average pooling with replicate padding of [B, H*W, D] tokens, then L2-normalisation."""
    batch, cells, dim = tokens.shape
    maps = tokens.transpose(1, 2).reshape(batch, dim, grid[0], grid[1])
    pooled = F.avg_pool2d(F.pad(maps, (1, 1, 1, 1), mode="replicate"), kernel_size=3, stride=1)
    return faiss_index.normalise_rows(pooled.reshape(batch, dim, cells).transpose(1, 2))


def match(
    query: torch.Tensor,
    reference: ReferenceSet,
    strategy: MatchStrategy,
    *,
    query_grid: tuple[int, int] | None = None,
    path: str = "torch",
    index: faiss.Index | None = None,
    candidates: int = DEFAULT_CANDIDATES,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> MatchResult:
    """Match L2-normalised query patches [B, L, D] against `reference` with `strategy`.

    `query_grid` defaults to the reference grid, else a square grid. `path="faiss"` uses `index`
    (built from `reference.search_vectors()` when None). Rows are independent, so results do not
    depend on batch size or on `max_elements`.
    """
    if path not in PATHS:
        raise ValueError(f"matching path {path!r} is not one of {PATHS}")
    if query.ndim != 3 or query.shape[2] != reference.features.shape[1]:
        raise ValueError(f"query must be [B, L, {reference.features.shape[1]}], got {tuple(query.shape)}")
    batch, cells, dim = query.shape
    if query_grid is not None and query_grid[0] * query_grid[1] != cells:
        raise ValueError(f"query_grid {tuple(query_grid)} does not hold the query's {cells} patches")
    grid = _query_grid(cells, query_grid or reference.grid)
    _check_strategy_fits(strategy, reference, grid)
    rows = query.reshape(batch * cells, dim).to(reference.features.dtype)
    row_positions = grid_positions(grid, device=query.device).repeat(batch, 1)
    pooled_rows = pool_tokens(query.float(), grid).reshape(batch * cells, dim) if strategy.pooling else None
    context = _Context(reference, strategy, grid)
    if path == "torch":
        matched, nearest = context.dense(rows, pooled_rows, row_positions, max_elements, batch=batch)
        fallback = 0
    else:
        matched, nearest, fallback = context.with_candidates(
            rows, pooled_rows, row_positions, index, candidates, max_elements
        )
    matched = faiss_index.normalise_rows(matched)
    anomaly = 1.0 - (rows * matched).sum(dim=-1)
    return MatchResult(
        matched=matched.view(batch, cells, dim),
        anomaly_map=anomaly.view(batch, cells),
        nearest=None if nearest is None else nearest.view(batch, cells),
        fallback_rows=fallback,
    )


def match_per_sample(
    query: torch.Tensor, references: torch.Tensor, strategy: MatchStrategy, *, grid: tuple[int, int]
) -> MatchResult:
    """Training-time matching: normalised query b against its own raw references [b] (whole grids)."""
    if references.ndim != 3 or references.shape[0] != query.shape[0]:
        raise ValueError(
            f"per-sample references must be [{query.shape[0]}, N, D], got {tuple(references.shape)}"
        )
    cells = grid[0] * grid[1]
    positions = grid_positions(grid, device=references.device).repeat(references.shape[1] // cells, 1)
    results = [
        match(
            query[b : b + 1],
            prepare_reference(references[b], positions, grid, pooling=strategy.pooling),
            strategy,
            query_grid=grid,
        )
        for b in range(query.shape[0])
    ]
    nearest = None if results[0].nearest is None else torch.cat([r.nearest for r in results])
    return MatchResult(
        torch.cat([r.matched for r in results]), torch.cat([r.anomaly_map for r in results]), nearest
    )


def _query_grid(cells: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    if grid is not None and grid[0] * grid[1] == cells:
        return tuple(grid)
    side = int(round(cells**0.5))
    if side * side != cells:
        raise ValueError(f"query has {cells} patches: give query_grid (not a square grid)")
    return (side, side)


def _check_strategy_fits(strategy: MatchStrategy, reference: ReferenceSet, grid: tuple[int, int]) -> None:
    if strategy.penalty:
        if reference.positions is None or reference.grid is None:
            raise ValueError(f"penalty {strategy.penalty!r} needs reference positions and grid")
        if tuple(reference.grid) != tuple(grid):
            raise ValueError(
                f"penalty {strategy.penalty!r}: query grid {grid} differs from "
                f"reference grid {tuple(reference.grid)}"
            )
    if strategy.pooling and reference.pooled is None:
        raise ValueError("strategy uses pooling: build the reference with prepare_reference(pooling=True)")


class _Context:
    """One match call's reference and strategy; row-block computations for both paths."""

    def __init__(self, reference: ReferenceSet, strategy: MatchStrategy, grid: tuple[int, int]):
        self.reference, self.strategy, self.grid = reference, strategy, grid

    def penalty(
        self, query_positions: torch.Tensor, reference_positions: torch.Tensor
    ) -> torch.Tensor | None:
        return spatial_penalty(
            self.strategy.penalty,
            self.strategy.spatial_penalty,
            query_positions,
            reference_positions,
            self.grid,
        )

    # ---- brute force ----
    def dense(self, rows, pooled_rows, positions, max_elements, batch=None):
        """Exact result for every row. 1-NN and top-K: blocked exact search (`knn.exact_search`) of the
        penalised search scores; sparsemax (needs every score of a row): dense row blocks. `batch`: the
        rows are `batch` whole query grids in order (what `match` passes), so blocks may run by position."""
        if self.strategy.weighting != "sparsemax":
            return self._searched(rows, pooled_rows, positions, max_elements)
        total = self.reference.features.shape[0]
        # cache-sized row blocks: the threshold re-reads its block's scores several times
        budget = min(max_elements, knn.default_block_bytes(rows.device) // rows.element_size())
        if batch and self.reference.positions is not None and self.strategy.has_penalty:
            return self._dense_by_position(rows, pooled_rows, batch, budget)
        step = max(1, budget // total)
        outputs = [
            self._dense_block(
                rows[i : i + step],
                None if pooled_rows is None else pooled_rows[i : i + step],
                positions[i : i + step],
            )
            for i in range(0, rows.shape[0], step)
        ]
        return _concat(outputs)

    def _searched(self, rows, pooled_rows, positions, max_elements):
        ref, strategy = self.reference, self.strategy
        pooled = pooled_rows is not None
        search_rows = torch.cat([pooled_rows, rows], dim=1) if pooled else rows
        has_penalty = bool(strategy.penalty) and ref.positions is not None

        def adjust(scores, block_rows, columns):
            if pooled:  # [pooled, plain] . [pooled, plain] = 2 * search similarity
                scores = scores.mul_(0.5)
            if has_penalty:
                penalty = self.penalty(positions[block_rows, None, :], ref.positions[None, columns])
                scores = scores.sub_(penalty)
            return scores

        k = 1 if strategy.weighting == "nearest" else strategy.k_neighbors
        _, columns = knn.exact_search(
            search_rows,
            ref.search_vectors(),
            k,
            adjust=adjust if pooled or has_penalty else None,
            block_bytes=_block_bytes(max_elements, rows),
        )
        if strategy.weighting == "nearest":
            return ref.features[columns[:, 0]], columns[:, 0]
        similarity = torch.einsum("rd,rkd->rk", rows, ref.features[columns])  # true similarity, exact
        weights = torch.softmax(similarity / strategy.temperature, dim=-1)
        return _weighted_sum(weights, columns, ref.features, max_elements), None

    def _dense_by_position(self, rows, pooled_rows, batch, budget):
        """Sparsemax of `batch` whole grids in blocks of grid positions taken across the batch: each block's
        penalty [positions, N] is computed once for every image instead of once per row."""
        ref, dim = self.reference, rows.shape[1]
        total, cells = ref.features.shape[0], rows.shape[0] // batch
        width = max(1, budget // (total * batch))  # grid positions per block
        query = rows.view(batch, cells, dim)
        pooled = None if pooled_rows is None else pooled_rows.view(batch, cells, dim)
        cell_positions = grid_positions(self.grid, device=rows.device)
        matched = torch.empty_like(query)
        for p0 in range(0, cells, width):
            cols = slice(p0, min(cells, p0 + width))
            search = self._search_scores(
                query[:, cols].reshape(-1, dim), None if pooled is None else pooled[:, cols].reshape(-1, dim)
            )
            penalty = self.penalty(cell_positions[cols, None, :], ref.positions[None])
            ranked = search.view(batch, -1, total).sub_(penalty).view(-1, total)
            matched[:, cols] = self._sparsemax_sum(ranked).view(batch, -1, dim)
        return matched.view(-1, dim), None

    def _dense_block(self, rows, pooled_rows, positions):
        """Sparsemax over all references for one block of rows (dense [rows, N] scores)."""
        ref = self.reference
        search = self._search_scores(rows, pooled_rows)
        penalty = None if ref.positions is None else self.penalty(positions[:, None, :], ref.positions[None])
        ranked = search if penalty is None else search.sub_(penalty)
        return self._sparsemax_sum(ranked), None

    def _search_scores(self, rows, pooled_rows):
        """Dense search similarities [rows, N]: plain, or the mean of pooled and plain (pooling)."""
        search = rows @ self.reference.features.T
        if pooled_rows is not None:
            search = (pooled_rows @ self.reference.pooled.T + search) / 2
        return search

    def _sparsemax_sum(self, ranked):
        """sum_j sparsemax(ranked)_j r_j per row, the threshold without sorting rows
        (`pruned_sparsemax_threshold`); overwrites `ranked`."""
        weights = ranked.sub_(pruned_sparsemax_threshold(ranked)).clamp_(min=0.0)
        return weights @ self.reference.features

    # ---- FAISS candidates ----
    def with_candidates(self, rows, pooled_rows, positions, index, candidates, max_elements):
        ref, strategy = self.reference, self.strategy
        if strategy.penalty and strategy.spatial_penalty < 0:
            raise ValueError("the FAISS path needs a spatial_penalty >= 0 (its exactness bound assumes it)")
        search_rows = rows if pooled_rows is None else torch.cat([pooled_rows, rows], dim=1)
        if index is not None and index.d != search_rows.shape[1]:
            raise ValueError(
                f"FAISS index has dimension {index.d}, the strategy searches {search_rows.shape[1]}"
                " (pooling needs an index over [pooled, features])"
            )
        total = ref.features.shape[0]
        matched = torch.empty_like(rows)
        nearest = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        pending = torch.arange(rows.shape[0], device=rows.device)
        count = min(total, max(candidates, strategy.k_neighbors if strategy.weighting == "softmax" else 1))
        for attempt in range(2):
            if pending.numel() == 0:
                break
            if index is None:  # exact candidates without an index: the blocked exact search
                scores, ids = knn.exact_search(
                    search_rows[pending],
                    ref.search_vectors(),
                    count,
                    block_bytes=_block_bytes(max_elements, rows),
                )
            else:
                scores, ids = faiss_index.search(index, search_rows[pending], count)
            if pooled_rows is not None:
                scores = scores / 2  # [pooled, plain] . [pooled, plain] = 2 * search similarity
            certified = self._candidate_rows(
                rows, positions, pending, scores, ids, count >= total, max_elements, matched, nearest
            )
            pending = pending[~certified]
            if attempt == 0:
                count = min(total, count * 8)
        fallback = int(pending.numel())
        if fallback:
            dense_matched, dense_nearest = self.dense(
                rows[pending],
                None if pooled_rows is None else pooled_rows[pending],
                positions[pending],
                max_elements,
            )
            matched[pending] = dense_matched
            if dense_nearest is not None:
                nearest[pending] = dense_nearest
        return matched, (nearest if self.strategy.weighting == "nearest" else None), fallback

    def _candidate_rows(
        self, rows, positions, pending, scores, ids, complete, max_elements, matched, nearest
    ):
        """Re-rank candidates `ids` [P, C] of rows `pending`; write results; return the certified mask [P]."""
        step = max(1, max_elements // (8 * ids.shape[1]))
        certified = []
        for start in range(0, pending.numel(), step):
            block_rows = pending[start : start + step]
            block_matched, block_nearest, ok = self._candidate_block(
                rows[block_rows],
                positions[block_rows],
                scores[start : start + step],
                ids[start : start + step],
                complete,
                max_elements,
            )
            matched[block_rows[ok]] = block_matched[ok]
            if block_nearest is not None:
                nearest[block_rows[ok]] = block_nearest[ok]
            certified.append(ok)
        return torch.cat(certified)

    def _candidate_block(self, rows, positions, search, ids, complete, max_elements):
        """Exact penalised re-rank of one block; `search` are FAISS's search similarities of `ids`."""
        ref, strategy = self.reference, self.strategy
        valid = ids >= 0
        safe_ids = ids.clamp_min(0)
        search = search.masked_fill(~valid, _INVALID_SCORE)
        penalty = (
            None if ref.positions is None else self.penalty(positions[:, None, :], ref.positions[safe_ids])
        )
        ranked = (search if penalty is None else search - penalty).masked_fill(~valid, _INVALID_SCORE)
        block_matched, block_nearest = self._aggregate_candidates(rows, ranked, safe_ids, valid, max_elements)
        if (complete or not strategy.penalty and strategy.weighting != "sparsemax") and bool(valid.all()):
            # all references seen, or no penalty: the top-k by search similarity is already the answer
            return block_matched, block_nearest, torch.ones(len(rows), dtype=torch.bool, device=rows.device)
        lowest_retrieved = search.masked_fill(~valid, float("inf")).amin(dim=-1)
        if strategy.weighting == "sparsemax":
            decision = sparsemax_threshold(ranked).squeeze(-1)
        elif strategy.weighting == "softmax":
            decision = ranked.topk(min(strategy.k_neighbors, ranked.shape[1]), dim=-1).values[:, -1]
        else:
            decision = ranked.amax(dim=-1)
        return block_matched, block_nearest, decision >= lowest_retrieved + CERTIFY_MARGIN

    def _aggregate_candidates(self, rows, ranked, ids, valid, max_elements):
        """Weight candidate columns (1-NN, sparsemax, top-K softmax); gathers only non-zero-weight vectors."""
        features, strategy = self.reference.features, self.strategy
        if strategy.weighting == "nearest":
            columns = ranked.argmax(dim=-1, keepdim=True)
            chosen = ids.gather(1, columns).squeeze(1)
            return features[chosen], chosen
        if strategy.weighting == "sparsemax":
            weights = sparsemax(ranked)
            support = int((weights > 0).sum(dim=-1).max())
            weights, columns = weights.topk(support, dim=-1)
            return _weighted_sum(weights, ids.gather(1, columns), features, max_elements), None
        _, columns = ranked.topk(min(strategy.k_neighbors, ranked.shape[1]), dim=-1)
        chosen = ids.gather(1, columns)
        similarity = torch.einsum("rd,rkd->rk", rows, features[chosen])  # true similarity, exact
        similarity = similarity.masked_fill(~valid.gather(1, columns), _INVALID_SCORE)
        weights = torch.softmax(similarity / strategy.temperature, dim=-1)
        return _weighted_sum(weights, chosen, features, max_elements), None


def _weighted_sum(weights, chosen, features, max_elements):
    """sum_s weights[r, s] * features[chosen[r, s]] in row blocks of bounded size."""
    step = max(1, max_elements // (chosen.shape[1] * features.shape[1]))
    return torch.cat(
        [
            torch.einsum("rs,rsd->rd", weights[i : i + step], features[chosen[i : i + step]])
            for i in range(0, len(chosen), step)
        ]
    )


def _block_bytes(max_elements, rows):
    """The exact search's score-block budget: its cache-sized default, within `max_elements`."""
    return min(knn.default_block_bytes(rows.device), max_elements * rows.element_size())


def _concat(outputs):
    matched = torch.cat([m for m, _ in outputs])
    nearest = None if outputs[0][1] is None else torch.cat([n for _, n in outputs])
    return matched, nearest
