import pytest
import torch

from residual_core.matching import sparsemax, topk_softmax
from residual_core.matching.weighting import sparsemax_threshold


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
