"""Curve points for plotting: the ROC equals scikit-learn's, PRO matches the AUPRO definition, thinning
keeps the shape and both ends, undefined curves say why."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve

from residual_core.metrics import MetricAccumulator
from residual_core.metrics.curve_points import pro_curve_points, roc_curve_points, thin_polyline
from tests.residual_core.metrics.references import exact_aupro, trapezoid_up_to


def _data(seed: int = 0, n: int = 10, size: int = 16):
    rng = np.random.default_rng(seed)
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    masks = np.zeros((n, size, size), bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(0, size - 5, 2)
        masks[i, y:y + 5, x:x + 5] = True
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
    return maps.reshape(n, -1).max(1), labels, maps, masks


def test_roc_points_equal_sklearn_at_both_levels():
    scores, labels, maps, masks = _data()
    acc = MetricAccumulator()
    acc.update(scores, labels, maps, masks)
    image = roc_curve_points(acc, "image", max_points=10_000)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(image.x, fpr)
    np.testing.assert_allclose(image.y, tpr)
    assert image.area == pytest.approx(acc.compute()["I-AUROC"])
    pixel = roc_curve_points(acc, "pixel", max_points=100_000)
    fpr, tpr, _ = roc_curve(masks.ravel(), maps.ravel(), drop_intermediate=False)
    np.testing.assert_allclose(pixel.x, fpr)
    np.testing.assert_allclose(pixel.y, tpr)
    assert pixel.metric == "P-AUROC" and pixel.defined


def test_pro_points_integrate_to_aupro():
    scores, labels, maps, masks = _data(1)
    acc = MetricAccumulator()
    acc.update(scores, labels, maps, masks)
    pro = pro_curve_points(acc, max_points=100_000)
    assert pro.limit == 0.3 and pro.metric == "AUPRO@0.3"
    assert pro.x[0] == 0 and pro.y[0] == 0 and pro.x[-1] == pytest.approx(1) and pro.y[-1] == pytest.approx(1)
    assert trapezoid_up_to(pro.x, pro.y, 0.3) / 0.3 == pytest.approx(exact_aupro(maps, masks), abs=1e-9)
    assert pro.area == pytest.approx(exact_aupro(maps, masks), abs=1e-9)


def test_thinning_keeps_ends_and_bounds_points():
    scores, labels, maps, masks = _data(2, n=12, size=24)
    acc = MetricAccumulator()
    acc.update(scores, labels, maps, masks)
    full = roc_curve_points(acc, "pixel", max_points=100_000)
    thin = roc_curve_points(acc, "pixel", max_points=50)
    assert len(full.x) > 1000 and len(thin.x) <= 51
    assert (thin.x[0], thin.y[0]) == (0, 0) and (thin.x[-1], thin.y[-1]) == (full.x[-1], full.y[-1])
    assert np.all(np.diff(thin.x) >= 0) and np.all(np.diff(thin.y) >= 0)
    # the thinned polyline stays within one step of the full one
    assert np.max(np.abs(np.interp(full.x, thin.x, thin.y) - full.y)) < 3 / 50
    with pytest.raises(ValueError, match="max_points"):
        thin_polyline(full.x, full.y, 1)


def test_without_masks_pixel_and_pro_curves_are_undefined_with_a_reason():
    scores, labels, _, _ = _data()
    acc = MetricAccumulator()
    acc.update(scores, labels)
    assert roc_curve_points(acc, "image").defined
    for curve in (roc_curve_points(acc, "pixel"), pro_curve_points(acc)):
        assert not curve.defined and curve.area is None and len(curve.x) == 0
        assert "ground-truth mask" in curve.undefined_reason
    only_normals = MetricAccumulator(pixel=False)
    only_normals.update(scores[:3], labels[:3])
    assert "need both classes" in roc_curve_points(only_normals, "image").undefined_reason
    assert "switched off" in pro_curve_points(only_normals).undefined_reason
    with pytest.raises(ValueError, match="level"):
        roc_curve_points(acc, "region")
