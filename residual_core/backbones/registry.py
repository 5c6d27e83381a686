"""Backbone spec strings -> builders.

Grammar: `<kind>:<arch>[@<weights>]` (e.g. `openclip:ViT-L-14-336@s3://bucket/clip.safetensors`,
`timm:wide_resnet50_2@/ckpt/wrn50.pth`) or a bare kind (`effnet-lite0`, optionally `effnet-lite0@<url>`).
`<weights>` is a local path, a URL read through `opener`, or an open_clip pretrained tag.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from residual_core.backbones.base import Backbone, BackboneError
from residual_core.backbones.checkpoints import Opener

Builder = Callable[..., Backbone]


@dataclass(frozen=True)
class BackboneSpec:
    kind: str
    arch: str | None
    weights: str | None


def _openclip_builder(spec: str, arch: str | None, weights: str | None, **kwargs: Any) -> Backbone:
    from residual_core.backbones.openclip import build_openclip

    if not arch:
        raise BackboneError(f"{spec!r}: openclip needs an architecture, e.g. openclip:ViT-L-14-336@<weights>")
    return build_openclip(spec, arch, weights, **kwargs)


def _timm_builder(spec: str, arch: str | None, weights: str | None, **kwargs: Any) -> Backbone:
    from residual_core.backbones.timm_cnn import build_timm

    if not arch:
        raise BackboneError(f"{spec!r}: timm needs an architecture, e.g. timm:wide_resnet50_2@<weights>")
    return build_timm(spec, arch, weights, **kwargs)


def _effnet_builder(spec: str, arch: str | None, weights: str | None, **kwargs: Any) -> Backbone:
    from residual_core.backbones.effnet_lite0 import build_effnet_lite0

    return build_effnet_lite0(spec, arch, weights, **kwargs)


BUILDERS: dict[str, Builder] = {
    "openclip": _openclip_builder,
    "timm": _timm_builder,
    "effnet-lite0": _effnet_builder,
}


def register_backbone_kind(kind: str, builder: Builder) -> None:
    """Add a backbone kind; `builder(spec, arch, weights, *, layers, image_size, device, opener, options)`."""
    if not kind or ":" in kind or "@" in kind:
        raise BackboneError(f"backbone kind {kind!r} must be non-empty and contain neither ':' nor '@'")
    BUILDERS[kind] = builder


def parse_spec(spec: str) -> BackboneSpec:
    """Split a spec string into kind, architecture and weights, with a clear error when malformed."""
    if not isinstance(spec, str) or not spec.strip() or spec != spec.strip():
        raise BackboneError(f"backbone spec {spec!r} must be a non-empty string without surrounding spaces")
    head, at, weights = spec.partition("@")
    kind, colon, arch = head.partition(":")
    if kind not in BUILDERS:
        raise BackboneError(f"backbone spec {spec!r}: unknown kind {kind!r}; known kinds: {sorted(BUILDERS)}")
    if colon and not arch:
        raise BackboneError(f"backbone spec {spec!r}: empty architecture after '{kind}:'")
    if at and not weights:
        raise BackboneError(f"backbone spec {spec!r}: empty weights after '@'")
    return BackboneSpec(kind=kind, arch=arch or None, weights=weights or None)


def create_backbone(
    spec: str,
    *,
    layers: tuple[int, ...] | list[int] | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    opener: Opener | None = None,
    **options: Any,
) -> Backbone:
    """Build a frozen backbone from its spec string. `layers`/`image_size` default per kind; `options`
    are kind-specific (openclip: `dpam_layer`, `global_ln_post`); `opener(url)` reads remote weights."""
    parsed = parse_spec(spec)
    return BUILDERS[parsed.kind](
        spec,
        parsed.arch,
        parsed.weights,
        layers=tuple(layers) if layers is not None else None,
        image_size=image_size,
        device=device,
        opener=opener,
        options=options,
    )
