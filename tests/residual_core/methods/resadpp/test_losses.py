"""ResAD++ losses against small hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from residual_core.methods.resadpp.losses import (
    GAUSS_CONST,
    combined_flow_loss,
    focal_loss,
    gaussian_logp,
    hypersphere_radius,
    log_barrier_bi_occ_loss,
    logsigmoid_flow_loss,
    normal_boundary,
    orthogonal_regularizer,
    semi_push_pull_loss,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def barrier(x: float) -> float:
    """-log sigmoid(-x) * exp(x) for one violation x."""
    return softplus(x) * math.exp(x)


def rows_with_radius(radii: list[float], dim: int = 3) -> torch.Tensor:
    """Rows whose hypersphere radius sqrt(||e|| + 1) - 1 equals the given values."""
    norms = torch.tensor([(r + 1) ** 2 - 1 for r in radii], dtype=torch.float64)
    direction = torch.zeros(len(radii), dim, dtype=torch.float64)
    direction[:, 0] = 1
    return direction * norms[:, None]


def test_radius_formula():
    e = torch.tensor([[3.0, 4.0]])
    assert hypersphere_radius(e).item() == pytest.approx(math.sqrt(6) - 1)


def test_occ_no_anomalies_all_inside_band_is_zero():
    e = rows_with_radius([0.397, 0.398, 0.3999])
    out = log_barrier_bi_occ_loss(e, torch.zeros(3), target=e.clone())
    assert out.r_max == pytest.approx(0.4) and out.r_min == pytest.approx(0.396)
    assert out.total.item() == 0.0 and out.anomaly.item() == 0.0


def test_occ_normals_on_both_sides_of_band():
    e = rows_with_radius([0.5, 0.6, 0.2, 0.398])
    out = log_barrier_bi_occ_loss(e, torch.zeros(4))
    above = (barrier(0.1) + barrier(0.2)) / 2
    below = barrier(0.396 - 0.2)
    assert out.normal.item() == pytest.approx(above + below, rel=1e-6)
    assert out.total.item() == pytest.approx(above + below, rel=1e-6)


def test_occ_with_anomalies_sets_r_max_and_pushes_them_out():
    e = rows_with_radius([0.1, 0.3, 0.8])  # normal, anomalous (inside push boundary), anomalous (outside)
    target = 2 * e  # same direction: cosine term 0; MSE = mean(e^2)
    mask = torch.tensor([0.0, 1.0, 1.0])
    out = log_barrier_bi_occ_loss(e, mask, target)
    r_max = 0.9 * 0.3
    r_min = 0.99 * r_max
    assert out.r_max == pytest.approx(r_max) and out.r_min == pytest.approx(r_min)
    normal = barrier(r_min - 0.1)
    mse = (e[1:] ** 2).mean().item()
    push = barrier(r_max + 0.1 - 0.3)  # only the 0.3 radius is below r_max + 0.1
    assert out.normal.item() == pytest.approx(normal, rel=1e-6)
    assert out.anomaly.item() == pytest.approx(mse + push, rel=1e-6)


def test_occ_r_max_capped_at_default():
    e = rows_with_radius([0.9, 1.0])
    out = log_barrier_bi_occ_loss(e, torch.tensor([1.0, 1.0]), target=e)
    assert out.r_max == pytest.approx(0.4)  # min(0.9 * 0.9, 0.4)
    assert out.normal.item() == 0.0


def test_occ_gradient_does_not_flow_through_barrier_weights():
    e = rows_with_radius([0.5]).requires_grad_(True)
    log_barrier_bi_occ_loss(e, torch.zeros(1)).total.backward()
    # d/dA [softplus(A - r) * const] at A=0.5 = sigmoid(0.1) * exp(0.1); dA/d||e|| = 1 / (2 sqrt(||e|| + 1))
    expected = (1 / (1 + math.exp(-0.1))) * math.exp(0.1) / (2 * 1.5)
    assert e.grad[0, 0].item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_hand_case():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)
    target = torch.tensor([0.0, 1.0])
    s = 1e-5
    pts = [0.8 * (1 - s) + 0.2 * s + s, 0.7 * (1 - s) + 0.3 * s + s]
    expected = sum(-((1 - pt) ** 2) * math.log(pt) for pt in pts) / 2
    assert focal_loss(probs, target).item() == pytest.approx(expected, rel=1e-9)


def test_semi_push_pull_only_counts_positions_on_the_wrong_side():
    logps = torch.tensor([-1.0, 0.5, 0.2, -0.5])
    mask = torch.tensor([0.0, 0.0, 1.0, 1.0])
    loss_n, loss_a = semi_push_pull_loss(logps, mask, torch.tensor(0.0), torch.tensor(-0.1))
    assert loss_n.item() == pytest.approx(softplus(1.0), rel=1e-6)
    assert loss_a.item() == pytest.approx(softplus(0.3), rel=1e-6)
    none_n, none_a = semi_push_pull_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0]),
                                         torch.tensor(0.0), torch.tensor(-0.1))
    assert none_n.item() == 0.0 and none_a.item() == 0.0


def test_normal_boundary_is_beta_quantile_of_normals():
    normal = torch.arange(40.0)[torch.randperm(40)]
    logps = torch.cat([normal, torch.tensor([-100.0, -200.0])])
    mask = torch.cat([torch.zeros(40), torch.ones(2)])
    assert normal_boundary(logps, mask, 0.05).item() == 2.0  # int(40 * 0.05) = 2nd smallest (0-based)
    assert normal_boundary(logps, torch.ones(42), 0.05) is None


def test_gaussian_logp_per_dimension():
    z = torch.zeros(2, 4)
    log_jac = torch.tensor([0.0, 8.0])
    assert gaussian_logp(z, log_jac).tolist() == pytest.approx([GAUSS_CONST, GAUSS_CONST + 2.0])
    assert gaussian_logp(torch.ones(1, 4), torch.zeros(1), center=1.0).item() == pytest.approx(GAUSS_CONST)
    assert gaussian_logp(torch.ones(1, 4), torch.zeros(1)).item() == pytest.approx(GAUSS_CONST - 0.5)


def test_logsigmoid_flow_loss_branches():
    logp_n = torch.tensor([0.5, -1.0, 0.0])
    logp_a = torch.tensor([-0.3, 0.2, 1.0])
    # no anomalies: -mean(log sigmoid(logp))
    loss, _ = logsigmoid_flow_loss(logp_n, logp_a, torch.zeros(3), (torch.tensor(0.0), torch.tensor(-0.1)))
    expected = sum(softplus(-v) for v in [0.5, -1.0, 0.0]) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # with anomalies: ML normal + ML anomaly + focal + semi-push-pull
    mask = torch.tensor([0.0, 0.0, 1.0])
    b_n, b_a = torch.tensor(0.0), torch.tensor(-0.1)
    loss, parts = logsigmoid_flow_loss(logp_n, logp_a, mask, (b_n, b_a), bgspp_lambda=1.0)
    ml = (softplus(-0.5) + softplus(1.0)) / 2
    ml_a = softplus(-1.0)
    probs = torch.softmax(torch.stack([logp_n, logp_a], -1), -1)
    focal = focal_loss(probs, mask).item()
    spp = softplus(1.0) + softplus(0.0 - (-0.1))  # normal -1.0 <= 0; anomaly logp_n 0.0 >= -0.1
    assert parts["focal"] == pytest.approx(focal)
    assert loss.item() == pytest.approx(ml + ml_a + focal + spp, rel=1e-6)


def test_combined_flow_loss_uses_plain_negative_logp():
    logp_n = torch.tensor([0.5, -1.0])
    logp_a = torch.tensor([-0.3, 0.2])
    loss, parts = combined_flow_loss(logp_n, logp_a, torch.zeros(2), None)
    assert loss.item() == pytest.approx(0.25) and parts["focal"] == 0.0
    mask = torch.tensor([0.0, 1.0])
    loss, _ = combined_flow_loss(logp_n, logp_a, mask, (torch.tensor(0.0), torch.tensor(-0.1)))
    probs = torch.softmax(torch.stack([logp_n, logp_a], -1), -1)
    expected = -0.5 - 0.2 + focal_loss(probs, mask).item() + 0.0 + 0.0  # nothing on the wrong side
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_orthogonal_regularizer():
    assert orthogonal_regularizer(torch.eye(3), torch.zeros(3)).item() == 0.0
    value = orthogonal_regularizer(2 * torch.eye(2), torch.zeros(2), weight=1.0).item()
    assert value == pytest.approx(((4 - 1) ** 2 * 2 / 4) / 2)
