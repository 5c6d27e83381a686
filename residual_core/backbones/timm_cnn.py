"""timm CNN backbones through `features_only` (ResAD's encoder: wide_resnet50_2, out_indices 1, 2, 3)."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features
from torch import Tensor, nn

from residual_core.backbones.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    BackboneError,
    BackboneFeatures,
    BackboneIdentity,
    check_layers,
    maps_to_tokens,
)
from residual_core.backbones.checkpoints import CheckpointError, Opener, load_checked, read_weights
from residual_core.backbones.folding import fold_batch_norms

# ResAD (main.py): timm.create_model('wide_resnet50_2', features_only=True, out_indices=(1, 2, 3))
DEFAULT_OUT_INDICES = (1, 2, 3)
# On CPUs the convolutions run on channels-last (NHWC) images: oneDNN's depthwise and 1x1 kernels are
# 1.4-2x faster that way for EfficientNet-Lite0 (RESULTS.md, eleventh pass); the maps then flatten to
# contiguous tokens without a copy. GPUs keep the default layout (not measured there).
CPU_MEMORY_FORMAT = torch.channels_last
# Feature models whose forward runs all of `blocks` (timm's own classes for these families).
_STAGED_FEATURE_MODELS = (EfficientNetFeatures, MobileNetV3Features)


class TimmCnnBackbone(Backbone):
    """Frozen timm feature pyramid; tokens [B, H*W, C] per chosen stage, global = pooled last stage."""

    def __init__(
        self,
        features: nn.Module,
        identity: BackboneIdentity,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__(identity, mean, std)
        self.features = features
        self.freeze()

    def forward_features(self, images: Tensor) -> BackboneFeatures:
        self.check_images(images)
        if images.device.type == "cpu":
            images = images.contiguous(memory_format=CPU_MEMORY_FORMAT)
        maps = self.features(images)
        tokens, grids = maps_to_tokens(list(maps))
        global_embedding = maps[-1].mean(dim=(2, 3))
        return BackboneFeatures(patch_tokens=tokens, grids=grids, global_embedding=global_embedding)


def create_timm_classifier(arch: str) -> nn.Module:
    """The full (classification) timm model, randomly initialised, never downloading weights."""
    if arch not in timm.list_models():
        raise BackboneError(f"timm:{arch}: unknown timm architecture")
    return timm.create_model(arch, pretrained=False).eval()


def classifier_prefix(model: nn.Module) -> str:
    """Parameter-name prefix of the classification head (features never use it)."""
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "fc"
    return head if isinstance(head, str) else head[0]


def features_from_classifier(arch: str, full: nn.Module, out_indices: tuple[int, ...]) -> nn.Module:
    """Build timm's `features_only` model and fill every tensor from the loaded full model.

    Feature wrappers that flatten nested sequentials rename `stem.0.w` to `stem_0.w`; both spellings
    are tried, and a tensor that finds no source is an error."""
    features = timm.create_model(arch, pretrained=False, features_only=True, out_indices=out_indices)
    source = full.state_dict()
    filled: dict[str, Tensor] = {}
    unfilled = []
    for name, tensor in features.state_dict().items():
        head, _, rest = name.partition(".")
        candidates = [name, head.replace("_", ".", 1) + ("." + rest if rest else "")]
        match = next((c for c in candidates if c in source and source[c].shape == tensor.shape), None)
        if match is None:
            unfilled.append(name)
        else:
            filled[name] = source[match]
    if unfilled:
        raise CheckpointError(f"timm:{arch}: features model tensors without a source: {unfilled[:12]}")
    features.load_state_dict(filled, strict=True)
    return fold_batch_norms(drop_unused_stages(features).eval())


def drop_unused_stages(features: nn.Module) -> nn.Module:
    """Cut timm's EfficientNet / MobileNetV3 feature models after the deepest requested level.

    Why: their feature models run every stage whatever `out_indices` asks (ResNet-style ones stop at the
    last level), so `effnet-lite0` at levels (1, 2, 3) also ran stages 5 and 6 (1,152 channels at stride 32)
    and threw them away: a third of its FLOPs, ~9 % of its CPU forward. The kept blocks are the same module
    objects, so timm's feature hooks and its stage loop give the same tensors."""
    if not isinstance(features, _STAGED_FEATURE_MODELS):
        return features
    deepest = max(_block_index(info["module"]) for info in features.feature_info.get_dicts())
    features.blocks = features.blocks[: deepest + 1]
    return features


def _block_index(module: str) -> int:
    """Top-level block index of a feature module name (`blocks.4` -> 4; the stem's `bn1` -> -1)."""
    parts = module.split(".")
    return int(parts[1]) if parts[0] == "blocks" else -1


def wrap_features(
    spec: str,
    arch: str,
    full: nn.Module,
    weights_sha256: str,
    *,
    layers: tuple[int, ...] | None,
    image_size: int | None,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: str | torch.device,
) -> TimmCnnBackbone:
    """Validate layers/size, build the feature model from `full`, and name it."""
    num_levels = len(full.feature_info)
    chosen = check_layers(layers or DEFAULT_OUT_INDICES, range(0, num_levels), spec)
    if list(chosen) != sorted(chosen):
        raise BackboneError(f"{spec}: timm out_indices must be increasing, got {chosen}")
    size = int(image_size or full.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    stride = max(full.feature_info[i]["reduction"] for i in chosen)
    if size <= 0 or size % stride:
        raise BackboneError(f"{spec}: image_size {size} must be a positive multiple of the stride {stride}")
    features = features_from_classifier(arch, full, chosen)
    identity = BackboneIdentity(name=spec, weights_sha256=weights_sha256, layers=chosen, image_size=size)
    return TimmCnnBackbone(features, identity, mean, std).to(device)


def build_timm(
    spec: str,
    arch: str,
    weights: str | None,
    *,
    layers: tuple[int, ...] | None,
    image_size: int | None,
    device: str | torch.device,
    opener: Opener | None,
    options: dict[str, Any],
) -> TimmCnnBackbone:
    """Builder of `timm:<arch>[@<checkpoint-url>]` (no URL: random init, for tests only)."""
    if options:
        raise BackboneError(f"{spec}: the timm kind takes no options, got {sorted(options)}")
    loaded = read_weights(weights, opener) if weights else None  # fail fast, before building
    full = create_timm_classifier(arch)
    weights_sha256 = ""
    if loaded is not None:
        # A checkpoint may lack or differ in the classification head: the features do not use it.
        load_checked(
            full, loaded.state_dict, source=weights, ignore_prefixes=(classifier_prefix(full) + ".",)
        )
        weights_sha256 = loaded.sha256
    cfg = full.pretrained_cfg or {}
    mean = tuple(cfg.get("mean", IMAGENET_MEAN))
    std = tuple(cfg.get("std", IMAGENET_STD))
    return wrap_features(
        spec,
        arch,
        full,
        weights_sha256,
        layers=layers,
        image_size=image_size,
        mean=mean,
        std=std,
        device=device,
    )
