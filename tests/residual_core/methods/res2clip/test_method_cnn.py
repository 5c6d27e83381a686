"""A CNN backbone without a text tower (the offline EfficientNet-Lite0) runs the visual branch alone."""

import pytest
import torch

from residual_core.methods import MethodError, create_method

from .helpers import make_bank, synthetic_category, textured_images


def test_visual_branch_alone(cnn_backbone):
    assert not cnn_backbone.has_text
    bank = make_bank(cnn_backbone, textured_images(2, 64, seed=3))
    queries = textured_images(2, 64, seed=3).clone()
    queries[1, :, 8:40, 8:40] += 3.0
    method = create_method("res2clip", cnn_backbone)
    assert method.plan.visual_layers == cnn_backbone.identity.layers
    out = method.score(queries, bank)
    assert out.branches == ("visual",) and set(out.branch_scores) == {"visual"}
    assert out.anomaly_map.shape == (2, 64, 64)
    torch.testing.assert_close(out.image_score, out.branch_scores["visual"])  # weight 1, no global term
    assert out.image_score[1] > out.image_score[0]


def test_text_branches_are_refused(cnn_backbone):
    with pytest.raises(MethodError, match="need a text encoder"):
        create_method("res2clip", cnn_backbone, branches=("text", "visual"))
    with pytest.raises(MethodError, match="need a text encoder"):
        create_method("res2clip", cnn_backbone, branches=("residual",))


def test_finetune_trains_visual_adapters_only(cnn_backbone):
    method = create_method("res2clip", cnn_backbone, mode="finetune", train={"epochs": 1, "batch_size": 2})
    assert set(method.adapters.groups()) == {"vis_adapters"}
    dims = {int(k): v for k, v in method.dims["tokens"].items()}
    assert len(set(dims.values())) > 1  # CNN levels have different widths, one adapter each
    before = {k: v.clone() for k, v in method.adapters.state_dict().items()}
    logged = []
    # two steps: the first runs at warm-up lr 0 (the authors' LambdaLR starts at factor 0)
    data = [synthetic_category("cnn", 64, count=4)]
    method.fit(data, lambda step, metrics: logged.append(metrics))
    assert logged and all(set(m) >= {"loss_visual", "loss_text"} for m in logged)
    assert len(logged) == method.planned_steps(data) == 2  # the progress bar's total
    changed = [k for k, v in method.adapters.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.startswith("vis_adapters.") for k in changed)


def test_visual_branch_scores_as_with_the_sorted_sparsemax(cnn_backbone, monkeypatch):
    """The pruned threshold and position blocks change nothing but float rounding: maps and scores as
    with the sort-based threshold on every row (banks of 512 tokens at the first level: pruned)."""
    from residual_core.matching import engine
    from residual_core.matching.weighting import sparsemax_threshold

    bank = make_bank(cnn_backbone, textured_images(2, 64, seed=3))
    queries = textured_images(3, 64, seed=5)
    queries[1, :, 8:40, 8:40] += 3.0
    fast = create_method("res2clip", cnn_backbone).score(queries, bank)
    monkeypatch.setattr(engine, "pruned_sparsemax_threshold", sparsemax_threshold)
    before = create_method("res2clip", cnn_backbone).score(queries, bank)
    torch.testing.assert_close(fast.anomaly_map, before.anomaly_map, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.image_score, before.image_score, atol=1e-5, rtol=1e-5)
