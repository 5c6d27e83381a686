"""The registry's per-seed hyper-parameters: seed 0 is the authors' seed, other run seeds shift a
trainable method's own seed (initialisation, shuffling) unless the parameters fix it."""

from __future__ import annotations

from residual_core.methods.registry import seeded_params
from residual_core.methods.res2clip import TrainConfig
from residual_core.methods.resadpp import make_config


def test_seed_zero_keeps_the_authors_seed():
    assert seeded_params("resadpp", {"epochs": 2}, 0) == {"epochs": 2}
    assert seeded_params("res2clip", {"mode": "finetune"}, 0) == {"mode": "finetune"}


def test_other_seeds_shift_the_methods_own_seed():
    assert seeded_params("resadpp", {"preset": "cpu"}, 2) == {"preset": "cpu", "seed": make_config().seed + 2}
    params = seeded_params("res2clip", {"mode": "finetune", "train": {"epochs": 1}}, 1)
    assert params == {"mode": "finetune", "train": {"epochs": 1, "seed": TrainConfig().seed + 1}}


def test_a_fixed_seed_and_methods_without_one_are_left_alone():
    assert seeded_params("resadpp", {"seed": 7}, 2) == {"seed": 7}
    assert seeded_params("res2clip", {"train": {"seed": 5}}, 2) == {"train": {"seed": 5}}
    assert seeded_params("baseline", {}, 2) == {}
    original = {"train": {"epochs": 1}}
    seeded_params("res2clip", original, 1)
    assert original == {"train": {"epochs": 1}}  # the caller's dict is not changed


def test_scoring_only_params_do_not_identify_a_training():
    from residual_core.methods.registry import training_params

    params = {"preset": "cpu", "score_branch": "boundary", "score_normalisation": "training"}
    assert training_params("resadpp", params) == {"preset": "cpu"}
    assert training_params("baseline", {"score_branch": 1}) == {"score_branch": 1}  # not a baseline knob
