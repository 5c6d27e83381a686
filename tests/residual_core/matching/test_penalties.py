import math

import pytest
import torch

from residual_core.matching import grid_positions, spatial_penalty

GAMMA = 0.01


def penalty_between(kind, query, reference, grid, gamma=GAMMA):
    value = spatial_penalty(kind, gamma, torch.tensor([query]), torch.tensor([reference]), grid)
    return float(value[0])


@pytest.mark.parametrize(
    ("kind", "query", "reference", "grid", "expected"),
    [
        ("local", (0, 0), (2, 1), (3, 3), math.sqrt(5)),
        ("radial", (0, 0), (1, 1), (3, 3), math.sqrt(2)),
        ("radial", (0, 1), (1, 2), (3, 3), 0.0),  # same ring
        ("radial_new", (0, 0), (1, 1), (3, 3), math.sqrt(2) / (math.sqrt(2) + 1e-6)),
        ("radial_margin", (0, 0), (2, 2), (5, 5), 2 * math.sqrt(2) - 2),
        ("radial_margin", (1, 1), (2, 2), (5, 5), 0.0),
        ("radial_laplace", (0, 0), (1, 1), (3, 3), 1 - math.exp(-math.sqrt(2))),
        ("polar_linear", (0, 1), (1, 2), (3, 3), math.pi / 2),
        (
            "polar",
            (0, 1),
            (1, 2),
            (3, 3),
            0.1 * (1 - math.exp(-((math.pi / 2) ** 2) / (2 * (math.pi / 4) ** 2))),
        ),
        # query at (-1, -1) from the centre (angle -3pi/4), reference at the centre (atan2(0, 0) = 0)
        ("polar", (0, 0), (1, 1), (3, 3), (1 - math.exp(-1.0)) + 0.1 * (1 - math.exp(-4.5))),
        ("radial_euc", (0, 0), (2, 2), (3, 3), 2 * math.sqrt(2) / (2 * math.sqrt(2) + 1e-6)),
        ("euc_new", (0, 0), (2, 2), (3, 3), 1 - math.exp(-(2 * math.sqrt(2) - 2))),
        ("euc_new", (0, 0), (1, 1), (3, 3), 0.0),
    ],
)
def test_penalties_match_hand_computed_values(kind, query, reference, grid, expected):
    assert penalty_between(kind, query, reference, grid) == pytest.approx(GAMMA * expected, abs=1e-7)


def test_no_penalty_is_none_and_penalties_scale_with_gamma():
    assert spatial_penalty("", GAMMA, torch.zeros(1, 2), torch.zeros(1, 2), (3, 3)) is None
    positions = grid_positions((4, 4))
    small = spatial_penalty("polar", 0.01, positions[:, None], positions[None], (4, 4))
    large = spatial_penalty("polar", 0.03, positions[:, None], positions[None], (4, 4))
    assert torch.allclose(large, 3 * small)
    assert (small >= 0).all() and torch.all(small.diagonal() == 0)


def test_dense_matrix_for_k_shots_is_the_single_shot_matrix_repeated():
    """The authors build [L, k_shot*L] by repeating the [L, L] matrix along references."""
    grid = (5, 5)
    positions = grid_positions(grid)
    single = spatial_penalty("radial", GAMMA, positions[:, None], positions[None], grid)
    three_shots = spatial_penalty("radial", GAMMA, positions[:, None], positions.repeat(3, 1)[None], grid)
    assert torch.equal(three_shots, single.repeat(1, 3))
    assert single.shape == (25, 25)


def test_grid_positions_are_row_major():
    assert grid_positions((2, 3)).tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
