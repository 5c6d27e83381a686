import pytest
import torch

from residual_core.matching import sparsemax, topk_softmax
from residual_core.matching.weighting import pruned_sparsemax_threshold, sparsemax_threshold


def bisection_sparsemax(scores: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """Independent check: solve sum(max(z - tau, 0)) = 1 for tau by bisection (float64)."""
    z = scores.double()
    low, high = z.amin(-1, keepdim=True) - 1.0, z.amax(-1, keepdim=True)
    for _ in range(steps):
        mid = (low + high) / 2
        too_low = (z - mid).clamp_min(0).sum(-1, keepdim=True) > 1
        low, high = torch.where(too_low, mid, low), torch.where(too_low, high, mid)
    return (z - (low + high) / 2).clamp_min(0)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([0.0, 0.0], [0.5, 0.5]),
        ([1.0, 0.0], [1.0, 0.0]),
        ([0.5, 0.2, 0.1], [0.5 + 0.2 / 3, 0.2 + 0.2 / 3, 0.1 + 0.2 / 3]),
        ([2.0, 1.5, 0.0, -1.0], [0.75, 0.25, 0.0, 0.0]),
        ([3.0], [1.0]),
    ],
)
def test_sparsemax_textbook_cases(scores, expected):
    assert torch.allclose(sparsemax(torch.tensor([scores])), torch.tensor([expected]), atol=1e-6)


def test_sparsemax_is_a_sparse_distribution_and_matches_bisection():
    scores = torch.randn(4, 7, 50, generator=torch.Generator().manual_seed(0)) * 3
    weights = sparsemax(scores)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(-1), torch.ones(4, 7), atol=1e-5)
    assert (weights == 0).any()
    assert torch.allclose(weights.double(), bisection_sparsemax(scores), atol=1e-5)
    assert torch.allclose(sparsemax(scores + 10.0), weights, atol=1e-5)  # shift invariance
    tau = sparsemax_threshold(scores)
    assert torch.allclose((scores - tau).clamp_min(0), weights, atol=1e-5)


@pytest.mark.parametrize("width", [1, 5, 63, 64, 100, 1000, 3136, 12544])
@pytest.mark.parametrize("spread", [3.0, 0.05, 0.002])  # wide: tiny support; narrow: hundreds of columns
def test_pruned_threshold_equals_the_sorted_threshold(width, spread):
    generator = torch.Generator().manual_seed(width)
    scores = torch.randn(3, 40, width, generator=generator, dtype=torch.float64) * spread
    pruned = pruned_sparsemax_threshold(scores)
    assert pruned.shape == (3, 40, 1)
    torch.testing.assert_close(pruned, sparsemax_threshold(scores), atol=1e-12, rtol=0)
    weights = (scores - pruned).clamp_min(0)
    torch.testing.assert_close(weights, bisection_sparsemax(scores), atol=1e-9, rtol=0)


def test_pruned_threshold_with_ties_masked_columns_and_float32():
    generator = torch.Generator().manual_seed(3)
    tied = torch.zeros(4, 500)  # every score equal: all in the support, weight 1/500 each
    tied[1] = 0.25
    masked = torch.randn(4, 500, generator=generator)
    masked[:, ::3] = -1.0e6  # stand-ins for "no candidate"
    repeated = torch.randint(0, 4, (4, 500), generator=generator).float() / 100  # many exactly tied maxima
    for scores in (tied, masked, repeated):
        expected = sparsemax_threshold(scores)
        torch.testing.assert_close(pruned_sparsemax_threshold(scores), expected, atol=1e-6, rtol=0)
    weights = (tied - pruned_sparsemax_threshold(tied)).clamp_min(0)
    assert torch.allclose(weights, torch.full((4, 500), 1 / 500))


def test_pruned_threshold_needs_scores():
    with pytest.raises(ValueError, match="at least one score"):
        pruned_sparsemax_threshold(torch.empty(2, 0))


def test_sparsemax_along_another_dim():
    scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(sparsemax(scores, dim=0), sparsemax(scores.T).T, atol=1e-6)


def test_topk_softmax_ranks_by_one_score_and_weights_by_another():
    ranking = torch.tensor([[0.9, 0.1, 0.8, 0.7]])
    weighting = torch.tensor([[0.0, 5.0, 0.05, 1.0]])
    weights, columns = topk_softmax(ranking, weighting, k=2, temperature=0.05)
    assert columns.tolist() == [[0, 2]]
    expected = torch.softmax(torch.tensor([0.0, 0.05]) / 0.05, dim=0)
    assert torch.allclose(weights[0], expected)


@pytest.mark.parametrize("spread", [3.0, 0.05, 0.002])
def test_michelot_iterates_are_lower_bounds_that_reach_the_threshold(spread):
    """The pruned threshold's bound stops Michelot's iteration after a few steps: every iterate must
    stay at or below the threshold (else chunks with weight would be dropped), and the last is it."""
    from residual_core.matching.weighting import _michelot

    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(50, 300, generator=generator, dtype=torch.float64) * spread
    exact = sparsemax_threshold(scores)
    start = (scores.sum(dim=1, keepdim=True) - 1.0) / scores.shape[1]
    previous = start
    for steps in range(6):
        bound = _michelot(scores, start, max_steps=steps)
        assert (bound <= exact + 1e-12).all() and (bound >= previous).all()
        previous = bound
    torch.testing.assert_close(_michelot(scores, start), exact, atol=1e-12, rtol=0)
