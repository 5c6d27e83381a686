"""Separable map filters: the blur-matrix GEMMs equal the convolutions they replace, at every border."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import correlate1d

from residual_core.methods import filters


def _taps(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("matrices", [True, False], ids=["blur-matrices", "convolutions"])
@pytest.mark.parametrize("shape", [(2, 12, 9), (1, 3, 4), (1, 1, 6)])
def test_reflect_border_is_scipys_correlate(shape, matrices, monkeypatch):
    monkeypatch.setattr(filters, "MATRIX_FILTER_MAX_SIDE", 10**6 if matrices else 0)
    maps = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    columns, rows = _taps(7, 2), _taps(5, 3)  # radius 3 and 2: wider than a 1-, 3- or 4-long side
    expected = correlate1d(maps.numpy(), columns.numpy(), axis=1, mode="reflect")
    expected = correlate1d(expected, rows.numpy(), axis=2, mode="reflect")
    ours = filters.separable_filter(maps, columns, rows, "reflect").numpy()
    assert np.abs(ours - expected).max() < 1e-12


@pytest.mark.parametrize("matrices", [True, False], ids=["blur-matrices", "convolutions"])
def test_zero_border_is_a_zero_padded_2d_convolution_with_the_outer_product(matrices, monkeypatch):
    monkeypatch.setattr(filters, "MATRIX_FILTER_MAX_SIDE", 10**6 if matrices else 0)
    maps = torch.rand(3, 10, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    columns, rows = _taps(5, 5), _taps(3, 6)
    expected = F.conv2d(maps[:, None], torch.outer(columns, rows)[None, None], padding=(2, 1))[:, 0]
    torch.testing.assert_close(filters.separable_filter(maps, columns, rows, "zeros"), expected)


def test_filter_matrix_needs_a_known_border():
    with pytest.raises(ValueError, match="border"):
        filters.filter_matrix(4, torch.ones(3), "wrap")
