"""Res2CLIP (Liu et al. 2026): few-shot generalist anomaly detection by residual-to-residual alignment.

`create_method("res2clip", backbone, mode="training-free" | "finetune", **overrides)`; see
`docs/methods/res2clip.md` for every formula and default and where it comes from in the authors' code.
"""

from dataclasses import replace

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


def res2clip_preprocess(params: dict) -> str:
    """The preset a `create_method("res2clip", ...)` with these keyword arguments uses (a checkpoint's
    saved config unless `preprocess` is given, else `mode`'s defaults)."""
    params = dict(params)
    checkpoint = params.pop("checkpoint", None)
    if checkpoint is not None:
        from residual_core.methods.res2clip.checkpoint import read_header

        saved = Res2ClipConfig.from_dict(read_header(checkpoint)["config"])
        return replace(saved, **params).preprocess if params else saved.preprocess
    mode = params.pop("mode", "training-free")
    return default_config(mode, **params).preprocess


def res2clip_seeded(params: dict, run_seed: int) -> dict:
    """`params` for training seed `run_seed`: the adapters' training seed (train.seed, 111) + run_seed."""
    train = dict(params.get("train") or {})
    if "seed" not in train:
        train["seed"] = TrainConfig().seed + run_seed
        params["train"] = train
    return params


@register_method("res2clip", preprocess=res2clip_preprocess, seeded=res2clip_seeded)
def build_res2clip(backbone, **config) -> Res2Clip:
    """Builder for the registry: `mode` picks the authors' defaults, other keys override them.

    `checkpoint=<directory>` builds the fine-tuned method from a saved checkpoint.
    """
    checkpoint = config.pop("checkpoint", None)
    if checkpoint is not None:
        return Res2Clip.from_checkpoint(checkpoint, backbone, **config)
    mode = config.pop("mode", "training-free")
    return Res2Clip(backbone, default_config(mode, **config))
