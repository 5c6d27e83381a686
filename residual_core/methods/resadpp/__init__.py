"""ResAD++ (xcyao00/ResAD): residual features, hypersphere constraintor, VQ matching, flow estimator."""

from __future__ import annotations

from residual_core.methods.registry import register_method
from residual_core.methods.resadpp.config import ResADppConfig, make_config
from residual_core.methods.resadpp.method import ResADpp


def resadpp_preprocess(params: dict) -> str:
    """The preset a `create_method("resadpp", ...)` with these keyword arguments uses."""
    return make_config(**params).preprocess


def resadpp_seeded(params: dict, run_seed: int) -> dict:
    """`params` for training seed `run_seed`: the config's seed (42 by default) + run_seed."""
    if "seed" not in params:
        params["seed"] = make_config(**params).seed + run_seed
    return params


@register_method("resadpp", preprocess=resadpp_preprocess, seeded=resadpp_seeded,
                 scoring_only=("score_branch", "score_normalisation", "smoothing_sigma"))
def build_resadpp(backbone, **config) -> ResADpp:
    """Registry builder: `create_method("resadpp", backbone, preset="cnn", epochs=..., ...)`."""
    return ResADpp(backbone, make_config(**config))


__all__ = ["ResADpp", "ResADppConfig", "build_resadpp", "make_config"]
