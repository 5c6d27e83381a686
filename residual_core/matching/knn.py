"""Exact k-nearest-neighbour search in score blocks: no [queries x references] matrix is ever held.

`exact_search(query, reference, k, metric=)` returns the same top-k as the dense
`(query @ reference.T).topk(k)` (cosine / inner product) or `torch.cdist(...).topk(k, largest=False)`
(squared L2), computed tile by tile:

  for each block of query rows:
      for each block of reference columns:
          scores = query_block @ reference_block.T        one GEMM into a reused, cache-sized buffer
          chunk maxima = max over each run of CHUNK columns (a fast values-only reduction)
          the winning chunk(s) -> exact positions inside the block (a gather of CHUNK x k scores)
          merge with the running best of the query block (strict >, so earlier columns win ties)

Why chunks: on CPUs an index-returning reduction (`max(dim)`, `argmax`, `topk`) over a score block
is slower than the GEMM that produced it, while a values-only `amax` is several times faster. Chunk
maxima find the block's winner with one fast pass; the index search then touches only the winning
chunk (top-1) or the k best chunks (top-k: every top-k score lies in one of the k chunks with the
highest maxima). Both passes read the block while it is still in cache.

Block sizes (`block_shape`): one score block holds at most `block_bytes` (CPU: `CPU_BLOCK_BYTES` =
2 MiB, the size of a core's L2 cache on current server CPUs, so the GEMM's output is re-read from cache
by the reductions; GPUs: `ACCELERATOR_BLOCK_BYTES` = 64 MiB, where kernel-launch count, not cache,
limits speed). The reference side takes up to `MAX_REFERENCE_BLOCK` columns (a whole few-shot bank at
low dimension, so the running merge is often skipped), rounded to a multiple of CHUNK, the query side
the rest of the budget (at least one row).

Ties: exact score ties (identical reference vectors, say) resolve to the lowest index for k = 1, as
`torch.argmax` does. Scores that differ only by float rounding may come out in either order, as they
do between any two GEMM blockings. For k > 1 the order among exactly tied scores is unspecified
(as in `torch.topk`).

Device-agnostic (the buffer and all index arithmetic live on the inputs' device), batch-first (query
[..., D] -> results [..., k]); the only Python loops are over blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

METRICS = ("ip", "cosine", "l2")
CPU_BLOCK_BYTES = 2 << 20
ACCELERATOR_BLOCK_BYTES = 64 << 20
MAX_REFERENCE_BLOCK = 4096
CHUNK = 64
# Chunk maxima pay off only while the k best chunks are a small part of a block.
_CHUNK_SHARE = 4

# adjust(scores [m, n], rows: slice of query rows, columns: slice of reference rows) -> scores
# (e.g. minus a spatial penalty); may work in place. Must not depend on anything but its arguments.
Adjust = Callable[[torch.Tensor, slice, slice], torch.Tensor]


@dataclass(frozen=True)
class BlockShape:
    """Query rows and reference columns per score block, and columns per chunk (1: no chunking)."""

    rows: int
    columns: int
    chunk: int


def default_block_bytes(device: torch.device | str) -> int:
    return CPU_BLOCK_BYTES if torch.device(device).type == "cpu" else ACCELERATOR_BLOCK_BYTES


def block_shape(
    queries: int,
    references: int,
    k: int = 1,
    *,
    device: torch.device | str = "cpu",
    block_bytes: int | None = None,
    element_size: int = 4,
) -> BlockShape:
    """The heuristic block shape for `queries` x `references` scores (see the module docstring)."""
    elements = max(1, (block_bytes or default_block_bytes(device)) // element_size)
    columns = min(max(1, references), MAX_REFERENCE_BLOCK, elements)
    if CHUNK <= columns < references:  # whole chunks in every block but the last
        columns = columns // CHUNK * CHUNK
    rows = max(1, min(max(1, queries), elements // columns))
    chunk = CHUNK if k * CHUNK * _CHUNK_SHARE <= columns else 1
    return BlockShape(rows, columns, chunk)


def exact_search(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int = 1,
    *,
    metric: str = "ip",
    adjust: Adjust | None = None,
    shape: BlockShape | None = None,
    block_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-`k` references of each query row, without materialising all scores.

    query [..., D], reference [N, D]. metric: "ip" (largest inner product), "cosine" (rows
    L2-normalised first, then "ip") or "l2" (smallest squared Euclidean distance). `adjust` edits each
    score block before ranking (ip/cosine only). Returns (scores [..., k'], indices [..., k'] long),
    best first, k' = min(k, N): similarities for ip/cosine, squared distances for l2. `shape` overrides
    the heuristic block shape (tests use it); `block_bytes` only the memory budget. The scores carry
    no gradient (recompute the chosen ones where a gradient is needed).
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if reference.ndim != 2 or query.ndim < 1 or query.shape[-1] != reference.shape[1]:
        raise ValueError(
            f"need query [..., D] and reference [N, D] with the same D; got "
            f"{tuple(query.shape)} and {tuple(reference.shape)}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if adjust is not None and metric == "l2":
        raise ValueError("adjust works on similarities (metric 'ip' or 'cosine'), not on L2 distances")
    with torch.no_grad():
        return _exact_search(query, reference, k, metric, adjust, shape, block_bytes)


def _exact_search(query, reference, k, metric, adjust, shape, block_bytes):
    lead, dim = query.shape[:-1], query.shape[-1]
    rows = query.reshape(-1, dim)
    if not rows.is_floating_point():
        rows = rows.float()
    reference = reference.to(device=rows.device, dtype=rows.dtype)
    if metric == "cosine":
        rows, reference = _normalise(rows), _normalise(reference)
    total, count = reference.shape[0], min(k, reference.shape[0])
    scores = torch.empty(rows.shape[0], count, dtype=rows.dtype, device=rows.device)
    indices = torch.empty(rows.shape[0], count, dtype=torch.long, device=rows.device)
    if rows.shape[0] and count:
        shape = shape or block_shape(
            rows.shape[0],
            total,
            count,
            device=rows.device,
            block_bytes=block_bytes,
            element_size=rows.element_size(),
        )
        bias = -0.5 * reference.square().sum(dim=1) if metric == "l2" else None
        _search(rows, reference, count, shape, bias, adjust, scores, indices)
        if metric == "l2":  # |q - r|^2 = |q|^2 - 2 (q.r - |r|^2 / 2)
            scores = (rows.square().sum(dim=1, keepdim=True) - 2 * scores).clamp_min(0)
    return scores.reshape(*lead, count), indices.reshape(*lead, count)


def nearest(
    query: torch.Tensor, reference: torch.Tensor, *, metric: str = "ip", **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 of `exact_search`: (scores [...], indices [...]); ties go to the lowest index."""
    if reference.shape[0] == 0:
        raise ValueError("nearest neighbour of an empty reference set")
    scores, indices = exact_search(query, reference, 1, metric=metric, **options)
    return scores[..., 0], indices[..., 0]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)  # the authors' normalisation, as faiss_index.normalise_rows


def _search(rows, reference, k, shape, bias, adjust, out_scores, out_indices):
    total = reference.shape[0]
    buffer = torch.empty(shape.rows * shape.columns, dtype=rows.dtype, device=rows.device)
    offsets = torch.arange(max(shape.chunk, 1), device=rows.device)
    for r0 in range(0, rows.shape[0], shape.rows):
        block_rows = slice(r0, min(r0 + shape.rows, rows.shape[0]))
        q = rows[block_rows]
        best_scores = best_indices = None
        for c0 in range(0, total, shape.columns):
            columns = slice(c0, min(c0 + shape.columns, total))
            ref = reference[columns]
            out = buffer[: q.shape[0] * ref.shape[0]].view(q.shape[0], ref.shape[0])
            if bias is None:
                block = torch.mm(q, ref.T, out=out)
            else:
                block = torch.addmm(bias[columns], q, ref.T, out=out)
            if adjust is not None:
                block = adjust(block, block_rows, columns)
            values, positions = _block_topk(block, k, shape.chunk, offsets)
            positions += c0
            if best_scores is None:
                best_scores, best_indices = values, positions
            elif k == 1:
                better = values > best_scores  # strict: the earlier column keeps a tie
                best_scores = torch.where(better, values, best_scores)
                best_indices = torch.where(better, positions, best_indices)
            else:
                merged = torch.cat([best_scores, values], dim=1)
                merged, order = merged.topk(min(k, merged.shape[1]), dim=1)
                best_indices = torch.cat([best_indices, positions], dim=1).gather(1, order)
                best_scores = merged
        out_scores[block_rows] = best_scores
        out_indices[block_rows] = best_indices


def _block_topk(block: torch.Tensor, k: int, chunk: int, offsets: torch.Tensor):
    """Top-k (values [m, k'], column positions [m, k']) of one score block [m, n], k' = min(k, n)."""
    m, n = block.shape
    k = min(k, n)
    if chunk <= 1 or n < chunk * k * _CHUNK_SHARE:
        if k == 1:
            values, positions = block.max(dim=1, keepdim=True)
            return values, positions
        return block.topk(k, dim=1)
    full = n // chunk * chunk
    maxima = block[:, :full].view(m, full // chunk, chunk).amax(dim=2)
    if full < n:
        maxima = torch.cat([maxima, block[:, full:].amax(dim=1, keepdim=True)], dim=1)
    if k == 1:
        values, chunks = maxima.max(dim=1, keepdim=True)  # the first chunk holding the maximum
        columns = (chunks * chunk + offsets).clamp_max_(n - 1)  # [m, chunk]
        inside = block.gather(1, columns).argmax(dim=1, keepdim=True)  # first position: lowest column
        return values, columns.gather(1, inside)
    _, chunks = maxima.topk(min(k, maxima.shape[1]), dim=1)
    columns = (chunks[:, :, None] * chunk + offsets).flatten(1)  # [m, k * chunk]
    outside = columns >= n  # the short last chunk's missing columns
    candidates = block.gather(1, columns.clamp_max(n - 1)).masked_fill_(outside, float("-inf"))
    values, inside = candidates.topk(k, dim=1)
    return values, columns.gather(1, inside)
