"""Exact k-nearest-neighbour search without the [queries x references] score matrix.

`exact_search(query, reference, k, metric=)` returns the same top-k as the dense
`(query @ reference.T).topk(k)` (cosine / inner product) or `torch.cdist(...).topk(k, largest=False)`
(squared L2), without ever holding more than one cache-sized block of scores. Two kernels, one contract:

- **torch** (any device, any float dtype, optional per-block `adjust` such as a spatial penalty):

      for each block of query rows:
          for each block of reference columns:
              scores = query_block @ reference_block.T      one GEMM into a reused buffer
              chunk maxima = max over each run of CHUNK columns (a fast values-only reduction)
              the winning chunk(s) -> exact positions in the block (a gather of CHUNK x k scores)
              merge with the query block's running best (strict >, so earlier columns win ties)

  Why chunks: on CPUs an index-returning reduction (`max(dim)`, `argmax`, `topk`) over a score block
  is slower than the GEMM that produced it, while a values-only `amax` is several times faster. Chunk
  maxima find the block's winner in one fast pass; the index search then touches only the winning
  chunk (top-1) or the k best chunks (top-k: every top-k score lies in one of the k chunks with the
  highest maxima). Both passes read the block while it is still in cache.
- **faiss**: FAISS's exact flat search (`faiss.knn` in BLAS blocks of `FAISS_QUERY_BLOCK` queries x
  `FAISS_REFERENCE_BLOCK` references, 2 MiB of scores like the torch kernel's CPU blocks, with a running
  top-k), CPU float32 only, at torch's thread count.

`backend="auto"` (the default) takes FAISS where it can run (CPU, float32, no `adjust`): measured side by
side in `benchmarks/matching.py` it beat the torch kernel in most few-shot CPU cases (1.1-1.7x for top-1
at dimensions 24-112) and trailed it only for top-64 on small banks; the torch kernel serves GPUs,
penalised scores, float64 and callers that need first-index ties.

Block sizes (`block_shape`, torch kernel): one score block holds at most `block_bytes` (CPU:
`CPU_BLOCK_BYTES` = 2 MiB, a core's L2 cache on current server CPUs, so the reductions re-read the
GEMM's output from cache; GPUs: `ACCELERATOR_BLOCK_BYTES` = 256 MiB, where the number of kernel
launches, not cache, limits speed). On a CPU the reference side takes up to `MAX_REFERENCE_BLOCK`
columns (a whole few-shot bank at low dimension, so the running merge is often skipped), split into
equal blocks of whole chunks (so the zero-padded last block wastes less than a chunk per block), the
query side the rest of the budget (at least one row). On a GPU a block spans up to
`ACCELERATOR_MAX_REFERENCE_BLOCK` columns (every few-shot bank whole) and is not chunked: a GPU's
index-returning `max` is as fast as `amax`, and the chunk passes and running merges only added
kernel launches (on an H100 the baseline's k = 4 matching took twice as long with CPU-shaped blocks as
with dense [rows, N] blocks; with these shapes its `method.score` ran 1.6x faster than with CPU-shaped
ones: RESULTS.md, "GPU paths" and "Eighth pass").

Ties: on the torch kernel, exact score ties (identical reference vectors) resolve to the lowest index
for k = 1, as `torch.argmax` does (a short last column block is zero-padded to the full width because a
GEMM of another width may round the same dot product differently). FAISS's kernel returns any one of
the tied references (all the same vector when the tie comes from duplicates); callers that need the
first index ask for `backend="torch"` (ResAD's matching does). Scores that differ only by float rounding
may come out in either order, as between any two GEMM blockings. For k > 1 the order among exactly tied
scores is unspecified (as in `torch.topk`).

Batch-first (query [..., D] -> results [..., k]); the only Python loops are over blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import faiss
import torch

METRICS = ("ip", "cosine", "l2")
BACKENDS = ("auto", "torch", "faiss")
CPU_BLOCK_BYTES = 2 << 20
ACCELERATOR_BLOCK_BYTES = 256 << 20
MAX_REFERENCE_BLOCK = 4096
ACCELERATOR_MAX_REFERENCE_BLOCK = 65536
CHUNK = 64
# FAISS's BLAS blocks (its defaults: 4096 x 1024, 16 MiB of scores, past a core's L2 cache). 256 x 2048
# was the fastest or within 6 % of it for every level of EfficientNet-Lite0 at k = 1 and 4, at 1 and 2
# threads: 1.1-1.24x the defaults at 1 thread on the stride-4 level; the baseline's method.score 1.02-1.03x
# (RESULTS.md, fifteenth pass).
FAISS_QUERY_BLOCK = 256
FAISS_REFERENCE_BLOCK = 2048
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
    on_cpu = torch.device(device).type == "cpu"
    widest = MAX_REFERENCE_BLOCK if on_cpu else ACCELERATOR_MAX_REFERENCE_BLOCK
    columns = min(max(1, references), widest, elements)
    if CHUNK <= columns < references:
        # equal blocks of whole chunks: the zero-padded last block wastes less than one chunk per block
        blocks = -(-references // (columns // CHUNK * CHUNK))
        columns = -(-references // (blocks * CHUNK)) * CHUNK
    rows = max(1, min(max(1, queries), elements // columns))
    chunk = CHUNK if on_cpu and k * CHUNK * _CHUNK_SHARE <= columns else 1
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
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-`k` references of each query row, without materialising all scores.

    query [..., D], reference [N, D]. metric: "ip" (largest inner product), "cosine" (rows
    L2-normalised first, then "ip") or "l2" (smallest squared Euclidean distance). `adjust` edits each
    score block before ranking (ip/cosine only). Returns (scores [..., k'], indices [..., k'] long),
    best first, k' = min(k, N): similarities for ip/cosine, squared distances for l2. `shape` overrides
    the heuristic block shape (tests use it); `block_bytes` only the memory budget. The scores carry
    no gradient (recompute the chosen ones where a gradient is needed). backend: "torch" (the blocked
    kernel above), "faiss" (FAISS's flat search, `faiss.knn`: CPU float32 without `adjust`, at torch's
    thread count) or "auto" (FAISS where `faiss_applies`, else torch).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
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
        return _exact_search(query, reference, k, metric, adjust, shape, block_bytes, backend)


def faiss_applies(rows: torch.Tensor, reference: torch.Tensor, adjust: Adjust | None) -> bool:
    """Whether FAISS's flat search can run: CPU float32 tensors and no per-block adjustment. There "auto"
    takes it: it beat the torch kernel in most CPU cases of `benchmarks/matching.py`."""
    return (
        adjust is None
        and rows.device.type == "cpu"
        and rows.dtype == torch.float32
        and reference.dtype == torch.float32
    )


def _exact_search(query, reference, k, metric, adjust, shape, block_bytes, backend):
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
    if backend == "faiss" and not faiss_applies(rows, reference, adjust):
        raise ValueError("the faiss backend needs CPU float32 tensors and no adjust")
    automatic = backend == "auto" and shape is None  # an explicit block shape asks for the torch kernel
    use_faiss = backend == "faiss" or (automatic and faiss_applies(rows, reference, adjust))
    if use_faiss and rows.shape[0] and count:
        scores, indices = _faiss_search(rows, reference, count, metric)
    elif rows.shape[0] and count:
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


def _faiss_search(rows, reference, k, metric):
    """FAISS's exact flat search at torch's thread count, always in BLAS blocks (`FAISS_QUERY_BLOCK`
    queries x `FAISS_REFERENCE_BLOCK` references, then a running top-k). FAISS's own default runs a
    per-query SIMD loop below 128,000 queries, which re-reads the whole bank for every query: 3-11x slower
    than BLAS blocks for 10^5-vector banks (benchmarks/matching.py), never faster in our sizes. FAISS's
    settings are process-wide: they are restored on the way out."""
    cvar = faiss.cvar
    saved = (faiss.omp_get_max_threads(), cvar.distance_compute_blas_threshold,
             cvar.distance_compute_blas_query_bs, cvar.distance_compute_blas_database_bs)
    faiss.omp_set_num_threads(torch.get_num_threads())
    cvar.distance_compute_blas_threshold = 0
    cvar.distance_compute_blas_query_bs = FAISS_QUERY_BLOCK
    cvar.distance_compute_blas_database_bs = FAISS_REFERENCE_BLOCK
    try:
        scores, indices = faiss.knn(
            rows.detach().contiguous().numpy(),
            reference.detach().contiguous().numpy(),
            k,
            metric=faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT,
        )
    finally:
        faiss.omp_set_num_threads(saved[0])
        (cvar.distance_compute_blas_threshold, cvar.distance_compute_blas_query_bs,
         cvar.distance_compute_blas_database_bs) = saved[1:]
    return torch.from_numpy(scores), torch.from_numpy(indices)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)  # the authors' normalisation, as faiss_index.normalise_rows


def _search(rows, reference, k, shape, bias, adjust, out_scores, out_indices):
    buffer = torch.empty(shape.rows * shape.columns, dtype=rows.dtype, device=rows.device)
    tables = _ChunkColumns(shape.chunk, rows.device)
    blocks = _column_blocks(reference, shape.columns)
    for r0 in range(0, rows.shape[0], shape.rows):
        block_rows = slice(r0, min(r0 + shape.rows, rows.shape[0]))
        q = rows[block_rows]
        best_scores = best_indices = None
        for columns, ref in blocks:
            out = buffer[: q.shape[0] * ref.shape[0]].view(q.shape[0], ref.shape[0])
            block = torch.mm(q, ref.T, out=out)
            real = block[:, : columns.stop - columns.start]
            if bias is not None:  # added apart from the GEMM: equal vectors keep bitwise-equal scores
                real.add_(bias[columns])
            if adjust is not None:
                adjusted = adjust(real, block_rows, columns)
                if adjusted is not real:
                    real.copy_(adjusted)
            if real.shape[1] < block.shape[1]:
                block[:, real.shape[1] :] = float("-inf")  # the zero padding of a short last block
            values, positions = _block_topk(block, min(k, real.shape[1]), shape.chunk, tables)
            positions += columns.start
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


def _column_blocks(reference: torch.Tensor, width: int) -> list[tuple[slice, torch.Tensor]]:
    """(columns, reference rows) per column block. A short last block is zero-padded to the full width
    (its extra scores are set to -inf): the GEMM may round a score differently in a block of another
    width, and equal reference vectors must keep bitwise-equal scores for ties to go to the first."""
    total = reference.shape[0]
    starts = range(0, total, width)
    blocks = [(slice(c0, min(c0 + width, total)), reference[c0 : c0 + width]) for c0 in starts]
    columns, last = blocks[-1]
    if len(blocks) > 1 and last.shape[0] < width:
        blocks[-1] = (columns, torch.cat([last, last.new_zeros(width - last.shape[0], last.shape[1])]))
    return blocks


class _ChunkColumns:
    """Per block width n: the [chunks, chunk] table of each chunk's columns (the short last chunk
    repeats column n - 1) and the mask of those repeats."""

    def __init__(self, chunk: int, device: torch.device) -> None:
        self.chunk, self.device, self._tables = chunk, device, {}

    def __call__(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if n not in self._tables:
            count = -(-n // self.chunk)
            columns = torch.arange(count * self.chunk, device=self.device).view(count, self.chunk)
            self._tables[n] = (columns.clamp_max(n - 1), columns >= n)
        return self._tables[n]


def _block_topk(block: torch.Tensor, k: int, chunk: int, tables: _ChunkColumns):
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
    table, repeated = tables(n)
    if k == 1:
        values, chunks = maxima.max(dim=1)  # the first chunk holding the maximum
        columns = table[chunks]  # [m, chunk]
        inside = block.gather(1, columns).argmax(dim=1, keepdim=True)  # first position: lowest column
        return values[:, None], columns.gather(1, inside)
    _, chunks = maxima.topk(min(k, maxima.shape[1]), dim=1)
    columns = table[chunks].flatten(1)  # [m, k * chunk]
    candidates = block.gather(1, columns).masked_fill_(repeated[chunks].flatten(1), float("-inf"))
    values, inside = candidates.topk(k, dim=1)
    return values, columns.gather(1, inside)
