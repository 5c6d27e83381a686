"""Res2CLIP (Liu et al. 2026): few-shot generalist anomaly detection by residual-to-residual alignment.

`create_method("res2clip", backbone, mode="training-free" | "finetune", **overrides)`; see
`docs/methods/res2clip.md` for every formula and default and where it comes from in the authors' code.
"""

from residual_core.methods.registry import register_method
from residual_core.methods.res2clip.config import (
    BranchWeights,
    LayerPlan,
    Res2ClipConfig,
    TrainConfig,
    default_config,
    resolve_plan,
)
from residual_core.methods.res2clip.method import Res2Clip

__all__ = [
    "BranchWeights",
    "LayerPlan",
    "Res2Clip",
    "Res2ClipConfig",
    "TrainConfig",
    "build_res2clip",
    "default_config",
    "resolve_plan",
]


@register_method("res2clip")
def build_res2clip(backbone, **config) -> Res2Clip:
    """Builder for the registry: `mode` picks the authors' defaults, other keys override them.

    `checkpoint=<directory>` builds the fine-tuned method from a saved checkpoint.
    """
    checkpoint = config.pop("checkpoint", None)
    if checkpoint is not None:
        return Res2Clip.from_checkpoint(checkpoint, backbone, **config)
    mode = config.pop("mode", "training-free")
    return Res2Clip(backbone, default_config(mode, **config))
