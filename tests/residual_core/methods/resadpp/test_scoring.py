"""ResAD++ map merging and smoothing (validate.py) on small hand-made inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from residual_core.methods.resadpp.scoring import (
    boundary_anomaly_map,
    gaussian_blur,
    image_scores,
    likelihood_anomaly_map,
    upsample,
)


@pytest.mark.parametrize("matrices", [True, False], ids=["blur-matrices", "convolutions"])
@pytest.mark.parametrize("shape", [(2, 40, 37), (1, 7, 5), (3, 33, 33), (1, 1, 40)])
def test_gaussian_blur_matches_scipy(shape, matrices, monkeypatch):
    """Both ways (GEMMs with blur matrices up to MATRIX_FILTER_MAX_SIDE, convolutions beyond) are scipy's
    filter, borders reflected as often as the radius (16) needs on maps narrower than it."""
    from residual_core.methods import filters

    monkeypatch.setattr(filters, "MATRIX_FILTER_MAX_SIDE", 10**6 if matrices else 0)
    maps = torch.rand(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = np.stack([gaussian_filter(m, sigma=4) for m in maps.numpy()])
    assert np.abs(gaussian_blur(maps, 4.0).numpy() - expected).max() < 1e-12
    float32 = gaussian_blur(maps.float(), 4.0).numpy()
    assert np.abs(float32 - expected).max() < 1e-6


def test_likelihood_map_sums_levels_and_flips():
    level0 = torch.full((1, 2, 2), -1.0)
    level1 = torch.full((1, 1, 1), 0.5)
    offsets = torch.tensor([0.0, 0.5])
    out = likelihood_anomaly_map([level0, level1], offsets, size=4, sigma=0.0)
    assert out.shape == (1, 4, 4)
    assert torch.allclose(out, torch.full((1, 4, 4), 2 - (math.exp(-1.0) + 1.0)))


def test_boundary_map_is_level_mean():
    a = torch.tensor([[[0.2, 0.4], [0.6, 0.8]]])
    b = torch.full((1, 1, 1), 0.5)
    out = boundary_anomaly_map([a, b], size=2, sigma=0.0)
    assert torch.allclose(out, (a + 0.5) / 2)


def test_upsample_align_corners_and_image_score():
    up = upsample(torch.tensor([[[0.0, 1.0]]]).expand(1, 2, 2), 3)
    assert up[0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])  # align_corners=True keeps the end values
    maps = torch.tensor([[[0.1, 0.9], [0.3, 0.2]], [[0.0, 0.0], [0.4, 0.0]]])
    assert image_scores(maps).tolist() == pytest.approx([0.9, 0.4])


def _random_set(n: int, grids: list[int], seed: int = 0):
    """Per-level log-likelihood and anomaly-probability maps of a small 'test set' [n, h, w]."""
    g = torch.Generator().manual_seed(seed)
    logps = [torch.randn(n, h, h, generator=g) * (level + 1) - 3.0 * level for level, h in enumerate(grids)]
    probs = [torch.rand(n, h, h, generator=g) for h in grids]
    return logps, probs


def test_test_set_normaliser_equals_authors_validate():
    """The authors' convert_to_anomaly_scores / aggregate_anomaly_scores (validate.py, read from their
    repository) on the whole set equal the normaliser's statistics + finish applied batch by batch."""
    from scipy.ndimage import gaussian_filter as scipy_gaussian_filter

    from residual_core.methods.resadpp.scoring import TestSetNormaliser, raw_batch
    from residual_core.methods.set_normalisation import normaliser_from_dict
    from tests.residual_core.methods.res2clip.authors_code import RESAD_MIRROR, authors_definitions

    theirs = authors_definitions("validate.py", {"convert_to_anomaly_scores", "aggregate_anomaly_scores"},
                                 {"torch": torch, "F": torch.nn.functional, "np": np,
                                  "gaussian_filter": scipy_gaussian_filter}, mirror=RESAD_MIRROR)
    size, grids, n = 32, [8, 4, 2], 7
    logps, probs = _random_set(n, grids)
    # the authors' validate() lists one tensor per test batch (batch size 1 in main.py)
    scores1 = theirs["convert_to_anomaly_scores"]([list(lp.split(1)) for lp in logps], 3, None, size)
    scores2 = theirs["aggregate_anomaly_scores"]([list(p.split(1)) for p in probs], 3, None, size)
    expected = (scores1 + scores2) / 2

    normaliser = normaliser_from_dict(TestSetNormaliser(3, size, 4.0).to_dict())
    batches = [(slice(0, 3)), slice(3, 5), slice(5, 7)]  # batches that do not match theirs
    raws = [raw_batch([lp[b] for lp in logps], [p[b] for p in probs]) for b in batches]
    stats = normaliser.statistics(lambda: iter(raws))
    outs = [normaliser.finish(raw, stats) for raw in raws]
    maps = torch.cat([o.anomaly_map for o in outs]).numpy()
    assert np.abs(maps - expected).max() < 2e-6
    scores = torch.cat([o.image_score for o in outs]).numpy()
    assert np.abs(scores - expected.reshape(n, -1).max(axis=1)).max() < 2e-6
    likelihood = torch.cat([o.branch_scores["likelihood"] for o in outs]).numpy()
    assert np.abs(likelihood - scores1.reshape(n, -1).max(axis=1)).max() < 2e-6
    assert stats["logp_max"] == pytest.approx([float(lp.max()) for lp in logps])


def test_streaming_score_differs_from_set_normalisation_only_by_offsets():
    """With offsets equal to the set's per-level maxima, the streaming maps equal the set-normalised
    ones up to the flip constant (a per-category shift that no metric sees)."""
    from residual_core.methods.resadpp.scoring import TestSetNormaliser, merged_output, raw_batch

    logps, probs = _random_set(4, [8, 4])
    normaliser = TestSetNormaliser(2, 16, 4.0)
    raw = raw_batch(logps, probs)
    stats = normaliser.statistics(lambda: iter([raw]))
    finished = normaliser.finish(raw, stats).anomaly_map
    streaming = merged_output(logps, probs, torch.tensor(stats["logp_max"]), 16, 4.0).anomaly_map
    shift = (stats["flip"] - 2) / 2
    assert torch.allclose(finished, streaming + shift, atol=1e-5)
