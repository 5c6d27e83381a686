"""The backbone interface: identity, per-layer patch features, and the frozen module base class."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

# OpenAI CLIP normalisation (Res2CLIP's clip_lib/transform.py uses the same constants).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(ValueError):
    """A backbone cannot be built or used as asked (bad spec, layers, size or input)."""


class TextEncoderUnavailableError(BackboneError):
    """`encode_text` was called on a backbone without a text tower."""


@dataclass(frozen=True)
class BackboneIdentity:
    """What makes two backbones produce the same features; part of every cache key and result."""

    name: str  # the spec string (plus non-default options), e.g. "effnet-lite0"
    weights_sha256: str  # sha256 of the weights file ("" when randomly initialised)
    layers: tuple[int, ...]
    image_size: int

    def key(self) -> str:
        """Short stable hash of all fields (16 hex chars)."""
        payload = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["layers"] = list(self.layers)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneIdentity:
        return cls(
            name=str(data["name"]),
            weights_sha256=str(data["weights_sha256"]),
            layers=tuple(int(layer) for layer in data["layers"]),
            image_size=int(data["image_size"]),
        )


@dataclass
class BackboneFeatures:
    """Multi-layer patch features of a batch of images."""

    patch_tokens: list[Tensor]  # one per chosen layer, [B, H_l*W_l, D_l]
    grids: list[tuple[int, int]]  # (H_l, W_l) per layer
    global_embedding: Tensor | None  # [B, E]


class Backbone(nn.Module):
    """A frozen feature extractor. Subclasses implement `forward_features` (and `encode_text`)."""

    identity: BackboneIdentity
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    has_text: bool = False

    def __init__(
        self,
        identity: BackboneIdentity,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.identity = identity
        self.image_size = identity.image_size
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.identity.layers

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def freeze(self) -> Backbone:
        """Switch to eval mode and stop gradients into the weights (backbones are never trained)."""
        for parameter in self.parameters():
            parameter.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> Backbone:
        """Backbones stay in eval mode (batch norm statistics, dropout) even inside a trained method."""
        return super().train(False)

    def forward(self, images: Tensor) -> BackboneFeatures:
        return self.forward_features(images)

    def forward_features(self, images: Tensor) -> BackboneFeatures:
        raise NotImplementedError

    def encode_text(self, texts: list[str]) -> Tensor:
        raise TextEncoderUnavailableError(
            f"backbone {self.identity.name!r} has no text tower; encode_text needs an openclip: backbone"
        )

    def check_images(self, images: Tensor) -> None:
        """Raise a clear error unless `images` is a float [B, 3, S, S] batch at this backbone's size."""
        if not isinstance(images, Tensor):
            raise BackboneError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise BackboneError(f"images must be [B, 3, S, S], got shape {tuple(images.shape)}")
        if not images.is_floating_point():
            raise BackboneError(f"images must be a normalised float tensor, got dtype {images.dtype}")
        size = self.image_size
        if tuple(images.shape[-2:]) != (size, size):
            raise BackboneError(
                f"backbone {self.identity.name!r} was built for {size}x{size} inputs, "
                f"got {images.shape[-2]}x{images.shape[-1]}"
            )


def maps_to_tokens(feature_maps: list[Tensor]) -> tuple[list[Tensor], list[tuple[int, int]]]:
    """[B, C, H, W] maps -> batch-first [B, H*W, C] tokens (row-major) and their (H, W) grids."""
    tokens = [fmap.flatten(2).transpose(1, 2) for fmap in feature_maps]
    grids = [(int(fmap.shape[-2]), int(fmap.shape[-1])) for fmap in feature_maps]
    return tokens, grids


def identity_name(spec: str, extras: dict[str, Any]) -> str:
    """The identity name: the spec string, plus `|k=v,...` for options that change the features."""
    if not extras:
        return spec
    suffix = ",".join(f"{key}={extras[key]}" for key in sorted(extras))
    return f"{spec}|{suffix}"


def check_layers(layers: tuple[int, ...], valid: range, what: str) -> tuple[int, ...]:
    """Validate chosen layer indices: non-empty, unique, each inside `valid`."""
    layers = tuple(int(layer) for layer in layers)
    if not layers:
        raise BackboneError(f"{what}: at least one layer must be chosen")
    if len(set(layers)) != len(layers):
        raise BackboneError(f"{what}: layers {layers} contain duplicates")
    bad = [layer for layer in layers if layer not in valid]
    if bad:
        raise BackboneError(f"{what}: layers {bad} are out of range [{valid.start}, {valid.stop - 1}]")
    return layers
