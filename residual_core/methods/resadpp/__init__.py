"""ResAD++ (xcyao00/ResAD): residual features, hypersphere constraintor, VQ matching, flow estimator."""

from __future__ import annotations

from residual_core.methods.registry import register_method
from residual_core.methods.resadpp.config import ResADppConfig, make_config
from residual_core.methods.resadpp.method import ResADpp


def resadpp_preprocess(params: dict) -> str:
    """The preset a `create_method("resadpp", ...)` with these keyword arguments uses."""
    return make_config(**params).preprocess


@register_method("resadpp", preprocess=resadpp_preprocess)
def build_resadpp(backbone, **config) -> ResADpp:
    """Registry builder: `create_method("resadpp", backbone, preset="cnn", epochs=..., ...)`."""
    return ResADpp(backbone, make_config(**config))


__all__ = ["ResADpp", "ResADppConfig", "build_resadpp", "make_config"]
