"""Shapes, invertibility and formulas of the ResAD++ building blocks."""

from __future__ import annotations

import math

import pytest
import torch

from residual_core.methods.resadpp.boundary import BoundaryAverager
from residual_core.methods.resadpp.constraintor import MultiLevelConstraintor
from residual_core.methods.resadpp.flow import LevelFlow, position_encoding, position_rows, position_table
from residual_core.methods.resadpp.vq import MultiLevelVQ, ResidualCodebook, match_feature_distribution

CHANNELS = [6, 10]


def level_maps(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 6, 8, 8, generator=g), torch.randn(batch, 10, 4, 4, generator=g)]


@pytest.mark.parametrize("kind", ["conv", "mlp_se"])
def test_constraintor_keeps_shapes(kind):
    out = MultiLevelConstraintor(CHANNELS, kind)(level_maps())
    assert [tuple(o.shape) for o in out] == [(2, 6, 8, 8), (2, 10, 4, 4)]


def test_constraintor_rejects_wrong_level_count():
    with pytest.raises(ValueError, match="2 levels"):
        MultiLevelConstraintor(CHANNELS)(level_maps()[:1])


def test_vq_quantize_shapes_and_codes():
    vq = MultiLevelVQ(CHANNELS, num_embeddings=5)
    quantized = vq.quantize(level_maps())
    assert [q.shape for q in quantized] == [m.shape for m in level_maps()]
    codes = vq.levels[0].embedding.weight
    flat = quantized[0].permute(0, 2, 3, 1).reshape(-1, 6)
    assert all(any(torch.equal(row, c) for c in codes) for row in flat)
    assert codes.abs().max() <= 1 / 5  # uniform(-1/n, 1/n) initialisation


def test_vq_scoring_lookup_picks_the_codes_training_picks():
    """quantize_map (exact blocked search) and training's cdist + argmin agree on ties-free data."""
    codebook = ResidualCodebook(300, 12)
    with torch.no_grad():
        codebook.embedding.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
    features = 0.3 * torch.randn(2, 12, 20, 20, generator=torch.Generator().manual_seed(5))
    flat = features.permute(0, 2, 3, 1).reshape(-1, 12)
    expected = codebook.embedding(codebook.nearest(flat)).reshape(2, 20, 20, 12).permute(0, 3, 1, 2)
    assert torch.equal(codebook.quantize_map(features), expected)


def test_vq_loss_sees_only_normal_positions():
    torch.manual_seed(0)
    codebook = ResidualCodebook(4, 3, beta=0.25)
    vectors = torch.randn(6, 3)
    codes = codebook.embedding.weight.detach()
    nearest = codes[torch.cdist(vectors, codes).argmin(1)]
    expected = 1.25 * ((nearest - vectors) ** 2).mean()
    assert codebook.loss(vectors).item() == pytest.approx(expected.item(), rel=1e-6)

    vq = MultiLevelVQ([3], num_embeddings=4)
    maps = [torch.randn(1, 3, 2, 2)]
    labels = [torch.tensor([[[0.0, 1.0], [-1.0, 0.0]]])]
    loss = vq.loss(maps, labels)
    changed = maps[0].clone()
    changed[0, :, 0, 1] += 100.0  # anomalous position
    changed[0, :, 1, 0] -= 100.0  # unknown position
    assert vq.loss([changed], labels).item() == pytest.approx(loss.item())
    assert vq.loss(maps, [torch.ones(1, 2, 2)]).requires_grad is False  # no normals: nothing to learn


def test_feature_distribution_matching():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, generator=g)
    ref = torch.randn(2, 3, 4, 5, generator=g) * 3 + 1
    assert torch.allclose(match_feature_distribution(x, ref, alpha=1.0), x)
    copied = match_feature_distribution(x, ref, alpha=0.0)
    # the value distribution of the reference, in the input's rank order
    assert torch.allclose(copied.reshape(2, 3, -1).sort(-1).values, ref.reshape(2, 3, -1).sort(-1).values)
    assert torch.equal(copied.reshape(2, 3, -1).argsort(-1), x.reshape(2, 3, -1).argsort(-1))
    half = match_feature_distribution(x, ref, alpha=0.4)
    sorted_x, order = x.reshape(2, 3, -1).sort(-1)
    expected_sorted = sorted_x + 0.6 * (ref.reshape(2, 3, -1).sort(-1).values - sorted_x)
    assert torch.allclose(half.reshape(2, 3, -1).gather(-1, order), expected_sorted)


def test_position_encoding_layout():
    enc = position_encoding(8, 3, 5)
    assert enc.shape == (8, 3, 5)
    h, w = 2, 4
    # first half: columns; frequencies exp(-2k ln(1e4)/4) for k = 0, 1
    freqs = [1.0, math.exp(-2 * math.log(1e4) / 4)]
    expected = [f(v * k) for v in (w, h) for k in freqs for f in (math.sin, math.cos)]
    assert enc[:, h, w].tolist() == pytest.approx(expected, abs=1e-6)
    rows = position_rows(8, 2, 3, 5, "cpu")
    assert rows.shape == (30, 8) and torch.equal(rows[15 + h * 5 + w], enc[:, h, w])
    with pytest.raises(ValueError, match="divisible by 4"):
        position_encoding(6, 2, 2)


@pytest.mark.parametrize("cond_dim", [None, 4])
def test_flow_is_invertible(cond_dim):
    flow = LevelFlow(6, coupling_layers=3, clamp_alpha=1.9, cond_dim=cond_dim, seed=0)
    x = torch.randn(5, 6)
    cond = torch.randn(5, 4) if cond_dim else None
    z, log_jac = flow(x, cond)
    assert z.shape == (5, 6) and log_jac.shape == (5,)
    x_back, log_jac_inv = flow.inverse(z, cond)
    assert torch.allclose(x_back, x, atol=1e-5)
    assert torch.allclose(log_jac_inv, -log_jac, atol=1e-5)


@pytest.mark.parametrize("dim", [6, 7])  # odd widths split unevenly
def test_forward_grids_equals_the_flow_on_repeated_conditions(dim):
    """The inference path that adds each position's condition term equals FrEIA's forward on the rows."""
    flow = LevelFlow(dim, coupling_layers=3, clamp_alpha=1.9, cond_dim=8, seed=0).eval()
    with torch.no_grad():
        for parameter in flow.parameters():  # away from the near-identity initialisation
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3 * 15, dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected_z, expected_log_jac = flow(x, position_rows(8, 3, 3, 5, "cpu"))
        terms = flow.condition_terms(position_table(8, 3, 5, "cpu"))
        z, log_jac = flow.forward_grids(x, terms)
        one_z, one_log_jac = flow.forward_grids(x[15:30], terms)  # any whole grid alone
    torch.testing.assert_close(z, expected_z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(log_jac, expected_log_jac, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_z, z[15:30], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one_log_jac, log_jac[15:30], atol=1e-6, rtol=1e-6)


def test_forward_grids_needs_a_conditional_flow_and_whole_grids():
    flow = LevelFlow(6, coupling_layers=2, clamp_alpha=1.9, cond_dim=None, seed=0)
    with pytest.raises(ValueError, match="conditional flow"):
        flow.condition_terms(torch.zeros(3, 4))
    conditional = LevelFlow(6, coupling_layers=2, clamp_alpha=1.9, cond_dim=4, seed=0)
    terms = conditional.condition_terms(torch.zeros(5, 4))
    with pytest.raises(ValueError, match="whole grids of 5 rows"):
        conditional.forward_grids(torch.zeros(7, 6), terms)


def test_flow_log_det_matches_numerical_jacobian():
    flow = LevelFlow(4, coupling_layers=2, clamp_alpha=1.9, cond_dim=4, seed=3).double()
    with torch.no_grad():  # move away from the near-identity initialisation
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(1, 4, dtype=torch.float64)
    cond = torch.randn(1, 4, dtype=torch.float64)
    _, log_jac = flow(x, cond)
    eps = 1e-6
    columns = []
    for i in range(4):
        step = torch.zeros_like(x)
        step[0, i] = eps
        plus, _ = flow(x + step, cond)
        minus, _ = flow(x - step, cond)
        columns.append(((plus - minus) / (2 * eps))[0])
    jacobian = torch.stack(columns, dim=1)
    assert torch.logdet(jacobian).item() == pytest.approx(log_jac.item(), abs=1e-5)


def test_flow_requires_condition_when_conditional():
    flow = LevelFlow(4, 1, 1.9, cond_dim=8)
    with pytest.raises(ValueError, match="width 8"):
        flow(torch.randn(2, 4))


def test_boundary_moving_average():
    avg = BoundaryAverager(2, momentum=0.9)
    avg.update(1, torch.tensor(-2.0))
    avg.update(1, torch.tensor(-4.0))
    avg.update(1, None)
    assert avg.get(1).item() == pytest.approx(0.9 * (0.1 * -2.0) + 0.1 * -4.0)
    assert avg.get(0).item() == 0.0
