"""Class-agnostic prompt bank and text residuals (authors' `models/clip.py`, `compute_text_features`).

Three prompt sets over the same 15 templates: neutral ("object"), normal-state ("", "perfect",
"flawless", "clean", "undamaged" + "object") and anomaly-state ("damaged object",
"object with damaged"). Each set is encoded, every prompt embedding L2-normalised, averaged over
the set and normalised again. The anomaly text residual is R_t = norm(t_anom - t_normal).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a cropped photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "the {} in the image.",
    "the {} in the scene.",
    "an image of a {}.",
    "an image of the {}.",
    "a rendering of a {}.",
    "a photo of one {}.",
    "showing the {}.",
    "showing a {}.",
    "itap of a {}.",
)
NOUNS: tuple[str, ...] = ("object",)
NORMAL_STATES: tuple[str, ...] = ("", "perfect", "flawless", "clean", "undamaged")
ANOMALY_STATES: tuple[str, ...] = ("damaged",)


@dataclass(frozen=True)
class PromptSets:
    neutral: tuple[str, ...]
    normal: tuple[str, ...]
    anomalous: tuple[str, ...]


@dataclass(frozen=True)
class TextResiduals:
    """Unit-norm text features, each [E]; `anomaly` is R_t."""

    neutral: Tensor
    normal: Tensor
    anomalous: Tensor
    normal_residual: Tensor  # norm(t_normal - t_neutral); computed by the authors, unused in scoring
    anomaly: Tensor  # R_t = norm(t_anom - t_normal)

    def to(self, device) -> TextResiduals:
        return TextResiduals(*(getattr(self, name).to(device) for name in self.__dataclass_fields__))


def _expand(cores: list[str]) -> tuple[str, ...]:
    # same order as the authors: for core in cores for template in templates
    return tuple(template.format(core) for core in cores for template in TEMPLATES)


def prompt_sets() -> PromptSets:
    """The exact prompt strings of the authors (a normal state "" yields " object", as theirs)."""
    neutral = list(NOUNS)
    normal = [f"{state} {noun}" for state in NORMAL_STATES for noun in NOUNS]
    anomalous = [f"{state} {noun}" for state in ANOMALY_STATES for noun in NOUNS] + [
        f"{noun} with {state}" for state in ANOMALY_STATES for noun in NOUNS
    ]
    return PromptSets(_expand(neutral), _expand(normal), _expand(anomalous))


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _mean_direction(encode_text: Callable[[list[str]], Tensor], prompts: tuple[str, ...]) -> Tensor:
    features = encode_text(list(prompts)).float()
    if features.ndim != 2 or features.shape[0] != len(prompts):
        raise ValueError(
            f"encode_text returned shape {tuple(features.shape)} for {len(prompts)} prompts; expected [T, E]"
        )
    return _unit(_unit(features).mean(dim=0))


@torch.no_grad()
def compute_text_residuals(encode_text: Callable[[list[str]], Tensor]) -> TextResiduals:
    """Encode the prompt bank once and derive the text residuals."""
    sets = prompt_sets()
    t_neutral = _mean_direction(encode_text, sets.neutral)
    t_normal = _mean_direction(encode_text, sets.normal)
    t_anom = _mean_direction(encode_text, sets.anomalous)
    return TextResiduals(
        neutral=t_neutral,
        normal=t_normal,
        anomalous=t_anom,
        normal_residual=_unit(t_normal - t_neutral),
        anomaly=_unit(t_anom - t_normal),
    )
