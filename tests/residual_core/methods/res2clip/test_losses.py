"""The authors' losses on hand-computed cases (2x2 grid, masks at the grid size: no resampling)."""

import pytest
import torch

from residual_core.methods.res2clip import losses

GRID = (2, 2)
MASK = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 2, 2)
SCORES = torch.tensor([[0.5, -0.2, 0.3, 2.0]])


def _residual_with_norms(norms):
    return torch.stack([torch.tensor([n, 0.0]) for n in norms])[None]  # [1, 4, 2]


def test_fixed_margin_ranking():
    # normal: (0.5 + 0) / 2 ; anomalous: (0.7 + 0) / 2
    assert losses.fixed_margin_ranking(SCORES, GRID, MASK, margin=1.0).item() == pytest.approx(0.6)


def test_dynamic_margin_ranking_uses_tau_times_residual_norm():
    base = _residual_with_norms([1.0, 2.0, 3.0, 4.0])  # margins 0.5, 1, 1.5, 2
    value = losses.dynamic_margin_ranking(SCORES, base, GRID, MASK, tau=0.5)
    assert value.item() == pytest.approx(0.25 + (1.2 + 0.0) / 2)


def test_magnitude_control():
    adapted = _residual_with_norms([1.0, 2.0, 3.0, 4.0])
    original = _residual_with_norms([2.0, 2.0, 2.0, 2.0])
    assert losses.magnitude_control(adapted, original, GRID, MASK).item() == pytest.approx(1.5 + 1.5)


def test_global_rankings():
    scores, labels = torch.tensor([0.5, 0.2]), torch.tensor([0, 1])
    assert losses.fixed_margin_ranking_global(scores, labels, margin=1.0).item() == pytest.approx(1.3)
    base = torch.tensor([[3.0, 4.0], [0.0, 2.0]])  # margins tau * 5, tau * 2
    value = losses.dynamic_margin_ranking_global(scores, base, labels, tau=0.5)
    assert value.item() == pytest.approx(0.5 + (1.0 - 0.2))


def test_regularisers():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert losses.direction_regulariser(a, b).item() == pytest.approx(1.0)
    assert losses.magnitude_regulariser(a, b).item() == pytest.approx(1.0)


def test_invalid_images_leave_pixel_losses():
    """An anomalous image without a mask (valid False) must not count its pixels as normal."""
    scores = torch.cat([SCORES, torch.full((1, 4), 5.0)])
    masks = torch.cat([MASK, torch.zeros(1, 1, 2, 2)])
    valid = torch.tensor([True, False])
    alone = losses.fixed_margin_ranking(SCORES, GRID, MASK, margin=1.0)
    both = losses.fixed_margin_ranking(scores, GRID, masks, margin=1.0, valid=valid)
    assert both.item() == pytest.approx(alone.item())
    no_pixels = losses.fixed_margin_ranking(
        scores, GRID, masks, margin=1.0, valid=torch.tensor([False, False])
    )
    assert no_pixels.item() == 0.0


def test_scores_are_upsampled_to_the_mask_size():
    big_mask = torch.zeros(1, 1, 8, 8)
    value = losses.fixed_margin_ranking(torch.full((1, 4), 0.25), GRID, big_mask, margin=1.0)
    assert value.item() == pytest.approx(0.25)
