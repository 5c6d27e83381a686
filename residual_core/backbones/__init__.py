"""Backbones: one interface over open_clip ViTs (Res2CLIP's DPAM path), timm CNNs and EfficientNet-Lite0."""

from residual_core.backbones.base import (
    Backbone,
    BackboneError,
    BackboneFeatures,
    BackboneIdentity,
    TextEncoderUnavailableError,
)
from residual_core.backbones.checkpoints import CheckpointError, Opener
from residual_core.backbones.registry import create_backbone, parse_spec, register_backbone_kind

__all__ = [
    "Backbone",
    "BackboneError",
    "BackboneFeatures",
    "BackboneIdentity",
    "CheckpointError",
    "Opener",
    "TextEncoderUnavailableError",
    "create_backbone",
    "parse_spec",
    "register_backbone_kind",
]
