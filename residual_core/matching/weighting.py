"""Weightings of candidate similarities: sparsemax (Martins & Astudillo, 2016) and top-k softmax."""

from __future__ import annotations

import torch

# Columns per chunk of `pruned_sparsemax_threshold`'s lower bound: small enough that the bound is tight
# (few chunks survive), large enough that the chunk maxima are few to rank. 32: on CPUs the maxima of
# runs of 32 floats took 7x less time than runs of 16 (which are not vectorised: 2x the score GEMM).
PRUNE_CHUNK = 32
# Chunk maxima whose threshold bounds tau from below: a subset's threshold is a valid bound whatever its
# size, and a few-shot bank's sparsemax support is well under this many chunks (measured: 60-230 scores).
PRUNE_BOUND_TOP = 64
# Michelot steps on those maxima (taken unsorted: a sorted top-k cost 4x as much) for the bound: any
# iterate is a lower bound, and a few reach the subset's threshold or nearly.
PRUNE_BOUND_STEPS = 3


def sparsemax(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Euclidean projection of `scores` onto the probability simplex along `dim`.

    Weights are non-negative, sum to 1 and are exactly zero below the threshold tau, where tau
    solves sum(max(z - tau, 0)) = 1. Invariant to adding a constant to all scores.
    """
    shifted, tau = _shifted_threshold(scores, dim)
    return (shifted - tau).clamp_min(0.0)


def sparsemax_threshold(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The threshold tau of sparsemax (kept dim), so that weights = max(scores - tau, 0)."""
    _, tau = _shifted_threshold(scores, dim)
    return tau + scores.amax(dim=dim, keepdim=True)


def pruned_sparsemax_threshold(scores: torch.Tensor, chunk: int = PRUNE_CHUNK) -> torch.Tensor:
    """`sparsemax_threshold` along the last dim without sorting whole rows (no gradient; [..., 1]).

    Why: Res2CLIP's sparsemax runs over a whole few-shot bank (thousands of references per query patch),
    and sorting every row was over 90 % of its matching time. Exact (up to float summation order) by:
      1. a subset's threshold never exceeds the row's (tau = max_k (sum of the top k - 1) / k, and a
         subset's top-k sums are no larger), and neither does any Michelot iterate towards it (step 3), so
         `PRUNE_BOUND_STEPS` iterations on the `PRUNE_BOUND_TOP` largest chunk maxima give a lower bound;
      2. a chunk whose maximum is <= that bound holds no positive weight: it is dropped (the kept chunks
         are picked by an unsorted top-k of the maxima, not a sort);
      3. on the kept scores, Michelot's iteration tau <- tau + (sum of (score - tau) over the scores above
         tau - 1) / their count, started at the bound, rises to tau and stops once the count no longer
         changes (it can only fall).
    """
    lead, width = scores.shape[:-1], scores.shape[-1]
    if width == 0:
        raise ValueError("sparsemax needs at least one score")
    with torch.no_grad():
        rows = scores.detach().reshape(-1, width)
        if width < 4 * chunk:
            return sparsemax_threshold(rows).reshape(*lead, 1)
        full = width // chunk * chunk
        maxima = rows[:, :full].view(rows.shape[0], -1, chunk).amax(dim=2)
        top = maxima.topk(min(PRUNE_BOUND_TOP, maxima.shape[1]), dim=1, sorted=False).values
        start = (top.sum(dim=1, keepdim=True) - 1.0) / top.shape[1]  # a lower bound of top's threshold
        tau = _michelot(top, start, max_steps=PRUNE_BOUND_STEPS)
        kept = int((maxima > tau).sum(dim=1).max())
        chunks = maxima.topk(kept, dim=1, sorted=False).indices  # every row's kept chunks (and a few more)
        offsets = torch.arange(chunk, device=rows.device)
        columns = (chunks[:, :, None] * chunk + offsets).flatten(1)
        values = torch.cat([rows.gather(1, columns), rows[:, full:]], dim=1)  # the short tail is always kept
        return _michelot(values, tau).reshape(*lead, 1)


def _michelot(values: torch.Tensor, tau: torch.Tensor, max_steps: int | None = None) -> torch.Tensor:
    """Michelot's iteration on rows of `values` from a lower bound `tau` [rows, 1] of their sparsemax
    threshold: tau <- tau + (sum of (value - tau) over the values above tau - 1) / their count. Every
    iterate is again a lower bound and they rise to the threshold, reached once the count no longer
    changes (it can only fall); `max_steps` stops early with a lower bound."""
    count, steps = None, 0
    while max_steps is None or steps < max_steps:
        excess = (values - tau).clamp_(min=0.0)
        # the count of positive excesses as a float sum of their signs (exact below 2^24 columns):
        # `count_nonzero` (a comparison, then an integer sum) took 5x as long, 17 % of a Res2CLIP batch
        new_count = excess.sign().sum(dim=1, keepdim=True)
        if count is not None and torch.equal(new_count, count):
            break
        count, steps = new_count, steps + 1
        # the maximum guards against float rounding: tau never falls, so the loop ends
        tau = torch.maximum(tau, tau + (excess.sum(dim=1, keepdim=True) - 1.0) / count)
    return tau


def _shifted_threshold(scores: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores - max, tau of the shifted scores)."""
    if scores.shape[dim] == 0:
        raise ValueError("sparsemax needs at least one score")
    shifted = scores - scores.amax(dim=dim, keepdim=True)  # numerical stability, tau shifts with it
    ordered, _ = torch.sort(shifted, dim=dim, descending=True)
    shape = [1] * scores.ndim
    shape[dim] = -1
    ranks = torch.arange(1, scores.shape[dim] + 1, device=scores.device, dtype=scores.dtype).view(shape)
    cumulative = ordered.cumsum(dim=dim)
    in_support = (1.0 + ranks * ordered) > cumulative
    support_size = (in_support * ranks).amax(dim=dim, keepdim=True)
    support_sum = (in_support * ordered).sum(dim=dim, keepdim=True)
    return shifted, (support_sum - 1.0) / support_size


def topk_softmax(
    ranking_scores: torch.Tensor, weight_scores: torch.Tensor, k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the top-`k` columns by `ranking_scores`; weight them by softmax(weight_scores / T).

    Res2CLIP ranks by penalised similarity but weights by the true (unpenalised) similarity.
    Returns (weights [..., k], column positions [..., k]).
    """
    k = min(k, ranking_scores.shape[-1])
    _, positions = ranking_scores.topk(k, dim=-1)
    chosen = weight_scores.gather(-1, positions)
    return torch.softmax(chosen / temperature, dim=-1), positions
