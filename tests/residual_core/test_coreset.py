import pytest
import torch

from residual_core.coreset import coreset_size, greedy_k_center


def naive_k_center(points, n_select, first):
    """Quadratic-memory textbook version for comparison."""
    distances = torch.cdist(points.double(), points.double()) ** 2
    chosen = [first]
    for _ in range(n_select - 1):
        chosen.append(int(distances[:, chosen].min(dim=1).values.argmax()))
    return chosen


def test_matches_the_textbook_greedy_algorithm():
    points = torch.randn(300, 12, generator=torch.Generator().manual_seed(0))
    selected = greedy_k_center(points, 20, seed=3)
    assert selected.tolist() == naive_k_center(points, 20, int(selected[0]))


def test_picks_one_point_per_separated_cluster_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    points = torch.cat([c + torch.randn(50, 2, generator=g) for c in centres])
    selected = greedy_k_center(points, 3, seed=7)
    assert sorted((selected // 50).tolist()) == [0, 1, 2]
    assert torch.equal(selected, greedy_k_center(points, 3, seed=7))
    assert len(set(greedy_k_center(points, 150, seed=7).tolist())) == 150  # all, no repeats


def test_duplicates_and_projection():
    points = torch.ones(10, 4)
    assert len(set(greedy_k_center(points, 10).tolist())) == 10
    wide = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    assert len(set(greedy_k_center(wide, 30, projection_dim=16, chunk_size=37).tolist())) == 30


def test_sizes_and_errors():
    assert coreset_size(1000, fraction=0.1) == 100
    assert coreset_size(5, fraction=0.01) == 1
    assert coreset_size(5, size=50) == 5
    with pytest.raises(ValueError, match="exactly one"):
        coreset_size(5)
    with pytest.raises(ValueError, match="coreset size must be"):
        greedy_k_center(torch.randn(5, 2), 6)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        greedy_k_center(torch.randn(5), 1)
