"""The 1-NN residual baseline on a tiny random backbone stand-in and on hand-made features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from residual_core.matching.knn import BlockShape
from residual_core.methods import create_method
from residual_core.methods.base import MethodError
from residual_core.methods.baseline import nearest_residual_norm
from tests.residual_core.methods.pooled_pixels import PooledPixels


class FakeBank:
    def __init__(self, backbone, references):
        out = backbone.forward_features(references)
        self.features = [t.reshape(-1, t.shape[-1]) for t in out.patch_tokens]


@pytest.mark.parametrize("shape", [BlockShape(7, 5, 2), BlockShape(1, 1, 1), BlockShape(64, 30, 64), None])
def test_nearest_residual_norm_matches_brute_force(shape):
    query, reference = F.normalize(torch.randn(50, 8), dim=1), F.normalize(torch.randn(30, 8), dim=1)
    expected = (query[:, None] - reference[None]).norm(dim=2).min(dim=1).values
    torch.testing.assert_close(nearest_residual_norm(query, reference, shape=shape), expected)


def dense_residual_norm(query, reference, chunk=4096):
    """The dense implementation the blocked search replaced."""
    out = torch.empty(query.shape[0])
    for start in range(0, query.shape[0], chunk):
        q = query[start : start + chunk]
        out[start : start + chunk] = (q - reference[(q @ reference.T).argmax(dim=1)]).norm(dim=1)
    return out


@pytest.mark.parametrize("normalize", [True, False])
def test_nearest_residual_norm_equals_the_dense_path(normalize):
    """Stride-4-like level (24 channels, a few thousand references), raw or normalised features."""
    g = torch.Generator().manual_seed(1)
    query, reference = torch.randn(3000, 24, generator=g), torch.randn(2500, 24, generator=g)
    if normalize:
        query, reference = F.normalize(query, dim=1), F.normalize(reference, dim=1)
    expected = dense_residual_norm(query, reference)
    for shape in (BlockShape(333, 1000, 64), BlockShape(100, 2500, 64), None):
        torch.testing.assert_close(nearest_residual_norm(query, reference, shape=shape), expected)
    with pytest.raises(MethodError, match="no features"):
        nearest_residual_norm(query, reference[:0])


def test_baseline_scores_zero_on_references_and_flags_the_defect():
    torch.manual_seed(0)
    backbone = PooledPixels()
    method = create_method("baseline", backbone)
    assert method.trainable is False
    assert method.config_dict() == {"normalize": True, "preprocess": "res2clip"}
    references = torch.rand(2, 3, 16, 16)
    bank = FakeBank(backbone, references)
    defective = references[:1].clone()
    defective[:, :, 4:8, 4:8] = torch.tensor([1.0, -1.0, 1.0])[:, None, None]
    out = method.score(torch.cat([references, defective]), bank)
    assert out.anomaly_map.shape == (3, 16, 16) and out.branches == ("visual",)
    assert out.image_score[:2].abs().max() < 1e-3  # the references themselves are normal
    assert out.image_score[2] > 0.1
    peak = out.anomaly_map[2].flatten().argmax()
    assert 2 <= peak // 16 <= 9 and 2 <= peak % 16 <= 9  # the map peaks on the pasted square
    batched = torch.cat([method.score(x[None], bank).image_score for x in torch.cat([references, defective])])
    torch.testing.assert_close(batched, out.image_score)
