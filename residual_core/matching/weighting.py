"""Weightings of candidate similarities: sparsemax (Martins & Astudillo, 2016) and top-k softmax."""

from __future__ import annotations

import torch


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
