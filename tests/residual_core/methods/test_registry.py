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


def test_only_the_asked_method_is_imported():
    """A baseline or PatchCore run builds its method without importing ResAD++'s flows (FrEIA, scipy.stats:
    ~0.9 s of every scoring actor's start); a listing still sees every built-in method."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from residual_core.backbones import create_backbone\n"
        "from residual_core.methods import available_methods, create_method, method_preprocess\n"
        "backbone = create_backbone('timm:resnet18', layers=(1,), image_size=64)\n"
        "create_method('baseline', backbone); method_preprocess('baseline'); method_preprocess('patchcore')\n"
        "heavy = ('FrEIA', 'scipy.stats', 'residual_core.methods.resadpp')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "print(available_methods())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported, listed = out.strip().splitlines()
    assert imported == "[]"
    assert all(name in listed for name in ("baseline", "patchcore", "res2clip", "resadpp"))
