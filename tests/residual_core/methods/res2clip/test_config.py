"""Configuration defaults (the authors') and branch/layer resolution."""

import pytest

from residual_core.methods import MethodError
from residual_core.methods.res2clip import Res2ClipConfig, default_config, resolve_plan


def test_authors_defaults_per_mode():
    free, tuned = default_config("training-free"), default_config("finetune")
    assert (free.pixel_weights.text, free.pixel_weights.visual, free.pixel_weights.residual) == (0.1, 1, 1)
    assert (tuned.pixel_weights.text, tuned.pixel_weights.visual, tuned.pixel_weights.residual) == (
        0.1,
        1,
        0.1,
    )
    assert (free.image_weights.text, free.image_weights.visual, free.image_weights.residual) == (1, 1, 1)
    assert (tuned.image_weights.text, tuned.image_weights.visual, tuned.image_weights.residual) == (1, 1, 0.1)
    assert (free.match_strategy, free.spatial_penalty) == ("sparse_radial_knn", 0.01)
    assert (free.gaussian_kernel_size, free.gaussian_sigma, free.top_fraction) == (5, 4.0, 0.01)
    train = tuned.train
    assert (train.epochs, train.batch_size, train.lr_visual, train.lr_text) == (10, 16, 5e-4, 1e-4)
    assert (train.betas, train.tau, train.grad_clip, train.seed) == ((0.5, 0.999), 1.0, 1.0, 111)


def test_vit_l_layers_resolve_to_the_authors_lists():
    free = resolve_plan(default_config("training-free"), (6, 12, 18, 24), has_text=True)
    assert (free.text_layers, free.visual_layers, free.residual_layers) == ((24,), (6, 12, 18, 24), (24,))
    tuned = resolve_plan(default_config("finetune"), (6, 12, 18, 24), has_text=True)
    assert tuned.residual_layers == (6, 12, 18, 24) and tuned.used_layers == (6, 12, 18, 24)
    assert free.branches == ("text", "visual", "residual")


def test_branches_without_text_tower():
    plan = resolve_plan(default_config(), (1, 2, 3), has_text=False)
    assert plan.branches == ("visual",) and plan.used_layers == (1, 2, 3)
    with pytest.raises(MethodError, match="need a text encoder"):
        resolve_plan(default_config(branches=("visual", "residual")), (1, 2, 3), has_text=False)


def test_bad_configs_are_clear_errors():
    with pytest.raises(MethodError, match="does not expose"):
        resolve_plan(default_config(visual_layers=(5,)), (1, 2, 3), has_text=True)
    with pytest.raises(MethodError, match="unknown mode"):
        default_config("zero-shot")
    with pytest.raises(MethodError, match="branches"):
        default_config(branches=("colour",))
    with pytest.raises(MethodError, match="unknown config keys"):
        default_config(lr=1.0)


def test_config_dict_round_trip():
    config = default_config("finetune", visual_layers=[1, 2], train={"epochs": 2, "betas": [0.9, 0.99]})
    assert config.visual_layers == (1, 2) and config.train.epochs == 2 and config.train.lr_text == 1e-4
    assert Res2ClipConfig.from_dict(config.to_dict()) == config
