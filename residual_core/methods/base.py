"""The interface every anomaly-detection method implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class ScoreOutput:
    """What a method returns for a batch of query images."""

    anomaly_map: Tensor  # [B, S, S] at the input image size
    image_score: Tensor  # [B]
    branch_scores: dict[str, Tensor] = field(default_factory=dict)  # name -> [B]
    branches: tuple[str, ...] = ()  # which branches ran


@dataclass
class CategoryTrainData:
    """One auxiliary category, decoded and preprocessed, for training a method."""

    dataset: str
    category: str
    references: Tensor  # [K, 3, S, S] normal images
    images: Tensor  # [N, 3, S, S]
    labels: Tensor  # [N] 0 normal / 1 anomalous
    masks: Tensor | None  # [N, 1, S, S] in {0, 1}; None when the dataset has no masks
    has_mask: Tensor  # [N] bool: which images carry a pixel mask

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.category}"

    def check_shapes(self, method: str) -> None:
        """Clear errors, naming the method and the category, for tensors that do not fit together."""
        n = self.images.shape[0]
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise MethodError(f"{method} training data {self.name}: images must be [N, 3, S, S]")
        if self.references.ndim != 4:
            raise MethodError(f"{method} training data {self.name}: references must be [K, 3, S, S]")
        if tuple(self.labels.shape) != (n,) or tuple(self.has_mask.shape) != (n,):
            raise MethodError(f"{method} training data {self.name}: labels and has_mask must be [{n}]")
        if self.masks is not None and tuple(self.masks.shape) != (n, 1, *self.images.shape[-2:]):
            raise MethodError(f"{method} training data {self.name}: masks {tuple(self.masks.shape)} "
                              f"must be [{n}, 1, S, S]")


class MethodError(ValueError):
    """A method was asked for something it cannot do (e.g. a branch the backbone lacks)."""


class AnomalyMethod(nn.Module):
    """Scores query images against a reference bank; trainable methods also `fit`."""

    name: str = "base"
    trainable: bool = False
    preprocess: str = "torch-bicubic"  # the residual_core.preprocess preset its inputs go through

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def score(self, images: Tensor, bank) -> ScoreOutput:  # bank: residual_core.bank.ReferenceBank
        raise NotImplementedError

    def fit(self, data: Sequence[CategoryTrainData], log: LogFn | None = None) -> None:
        if self.trainable:
            raise NotImplementedError
        # training-free methods have nothing to fit

    def config_dict(self) -> dict:
        """JSON-serialisable hyper-parameters (saved with checkpoints and results)."""
        return {}

    def save_checkpoint(self, directory: str | Path) -> None:
        raise MethodError(f"method {self.name!r} has no learnable parts to save")

    def load_checkpoint(self, directory: str | Path) -> None:
        raise MethodError(f"method {self.name!r} has no learnable parts to load")
