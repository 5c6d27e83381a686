"""Res2CLIP on a tiny random open_clip ViT (4 blocks, 4x4 patch grid, embed dim 32)."""

import pytest
import torch

from residual_core.methods import MethodError, create_method

from .helpers import make_bank, textured_images


@pytest.fixture(scope="module")
def clip_bank(clip_backbone):
    return make_bank(clip_backbone, textured_images(2, 64, seed=1))


@pytest.fixture(scope="module")
def queries():
    images = textured_images(3, 64, seed=1)[:3].clone()
    images[1, :, 16:32, 16:32] += 2.0
    return images


def test_registry_builds_both_modes(clip_backbone):
    free = create_method("res2clip", clip_backbone)
    tuned = create_method("res2clip", clip_backbone, mode="finetune")
    assert not free.trainable and tuned.trainable
    assert free.plan.residual_layers == (4,) and tuned.plan.residual_layers == (1, 2, 3, 4)
    assert free.config_dict()["resolved"]["text_layers"] == [4]


def test_training_free_scores_shapes_and_ranges(clip_backbone, clip_bank, queries):
    method = create_method("res2clip", clip_backbone)
    out = method.score(queries, clip_bank)
    assert out.branches == ("text", "visual", "residual")
    assert out.anomaly_map.shape == (3, 64, 64) and out.anomaly_map.dtype == torch.float32
    assert out.image_score.shape == (3,) and torch.isfinite(out.image_score).all()
    scores = out.branch_scores
    assert set(scores) == {"text", "visual", "residual"}
    assert ((scores["text"] >= -1) & (scores["text"] <= 1)).all()  # mean of cosines
    assert ((scores["visual"] >= 0) & (scores["visual"] <= 2)).all()  # norm of a unit-vector difference
    assert ((scores["residual"] >= 0) & (scores["residual"] <= 2)).all()  # clamped projections
    assert (out.anomaly_map >= -1).all()
    torch.testing.assert_close(out.image_score, scores["text"] + scores["visual"] + scores["residual"])


def test_reference_image_scores_lowest_on_the_visual_branch(clip_backbone):
    refs = textured_images(3, 64, seed=2)
    bank = make_bank(clip_backbone, refs[:1])
    method = create_method("res2clip", clip_backbone, branches=("visual",), match_strategy="radial_1nn")
    out = method.score(refs, bank)
    assert out.branches == ("visual",)
    assert out.branch_scores["visual"][0] < 1e-3  # the query is the reference itself
    assert (out.branch_scores["visual"][1:] > out.branch_scores["visual"][0]).all()


def test_batch_size_does_not_change_results(clip_backbone, clip_bank, queries):
    method = create_method("res2clip", clip_backbone, mode="finetune")
    whole = method.score(queries, clip_bank)
    parts = [method.score(queries[i : i + 1], clip_bank) for i in range(3)]
    torch.testing.assert_close(
        whole.anomaly_map, torch.cat([p.anomaly_map for p in parts]), atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        whole.image_score, torch.cat([p.image_score for p in parts]), atol=1e-5, rtol=1e-5
    )


def test_untrained_adapters_are_the_identity(clip_backbone, clip_bank, queries):
    """Zero-initialised adapters: finetune branch scores equal training-free ones on the same layers."""
    tuned = create_method("res2clip", clip_backbone, mode="finetune").score(queries, clip_bank)
    free = create_method("res2clip", clip_backbone, residual_layers=(1, 2, 3, 4)).score(queries, clip_bank)
    for name in ("text", "visual", "residual"):
        torch.testing.assert_close(tuned.branch_scores[name], free.branch_scores[name])


def test_faiss_path_matches_torch_path(clip_backbone, clip_bank, queries):
    torch_out = create_method("res2clip", clip_backbone).score(queries, clip_bank)
    faiss_out = create_method("res2clip", clip_backbone, match_path="faiss").score(queries, clip_bank)
    torch.testing.assert_close(faiss_out.image_score, torch_out.image_score, atol=1e-4, rtol=1e-4)


def test_branch_and_layer_errors(clip_backbone, clip_bank, queries):
    with pytest.raises(MethodError, match="does not expose"):
        create_method("res2clip", clip_backbone, text_layers=(24,))
    method = create_method("res2clip", clip_backbone)
    with pytest.raises(MethodError, match=r"\[B, 3, S, S\]"):
        method.score(queries[0], clip_bank)
    with pytest.raises(MethodError, match="cannot load adapters"):
        method.load_checkpoint("/nonexistent")


def test_switching_banks_uses_the_new_bank(clip_backbone, clip_bank, queries):
    other_bank = make_bank(clip_backbone, textured_images(1, 64, seed=9), category="other")
    method = create_method("res2clip", clip_backbone, branches=("visual",))
    method.score(queries, clip_bank)  # fills the per-bank reference cache
    switched = method.score(queries, other_bank)
    fresh = create_method("res2clip", clip_backbone, branches=("visual",)).score(queries, other_bank)
    torch.testing.assert_close(switched.image_score, fresh.image_score)
