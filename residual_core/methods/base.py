"""The interface every anomaly-detection method implements."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

# `fit`'s progress callback: called after every optimisation step with the 1-based global step and that
# step's loss terms (`loss_<term>`), plus `epoch` (0-based) and method-specific context (stage, lr)
LogFn = Callable[[int, dict[str, float]], None]


@dataclass
class ScoreOutput:
    """What a method returns for a batch of query images."""

    anomaly_map: Tensor  # [B, S, S] at the input image size
    image_score: Tensor  # [B]
    branch_scores: dict[str, Tensor] = field(default_factory=dict)  # name -> [B]
    branches: tuple[str, ...] = ()  # which branches ran


@dataclass
class ImagePool:
    """Normal images of one category kept compactly: resized RGB pixels as uint8, normalised on read.

    A category's whole `train/good` set can be large (MVTec: ~3600 images over 15 categories); uint8
    holds a 224 px image in 147 KiB, a quarter of float32. The authors' loaders also resize in 8 bits
    (PIL) before normalising, so storing the resized pixels as uint8 loses nothing they keep.
    """

    pixels: Tensor  # [P, 3, S, S] uint8
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    split: str = "train"  # the dataset split the images come from (provenance)

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 4 or self.pixels.shape[1] != 3:
            raise MethodError(f"ImagePool pixels must be uint8 [P, 3, S, S], got {self.pixels.dtype} "
                              f"{tuple(self.pixels.shape)}")

    def __len__(self) -> int:
        return int(self.pixels.shape[0])

    def images(self, index: Tensor | Sequence[int] | None = None) -> Tensor:
        """Normalised float images [n, 3, S, S] (all of them when `index` is None)."""
        pixels = self.pixels if index is None else self.pixels[torch.as_tensor(index, dtype=torch.long)]
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    @staticmethod
    def quantize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
        """Normalised float images [n, 3, S, S] -> their pixels in uint8 (rounded, clipped to 0..255)."""
        mean_t = torch.tensor(tuple(mean), dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(tuple(std), dtype=torch.float32).view(1, 3, 1, 1)
        pixels = (images.float() * std_t + mean_t) * 255.0
        return pixels.round_().clamp_(0, 255).to(torch.uint8)


@dataclass
class CategoryTrainData:
    """One auxiliary category, decoded and preprocessed, for training a method.

    `images` (with labels and masks) and the few fixed `references` are what every trainable method
    gets. `normal_pool` is filled only for methods that ask for it (`AnomalyMethod.uses_normal_pool`):
    the category's normal images of the `train` split, all of them unless capped. `image_split` and
    `reference_split` name the splits `images` and `references` come from (provenance for train logs).
    Methods that ignore the pool see exactly the data they saw before.
    """

    dataset: str
    category: str
    references: Tensor  # [K, 3, S, S] normal images
    images: Tensor  # [N, 3, S, S]
    labels: Tensor  # [N] 0 normal / 1 anomalous
    masks: Tensor | None  # [N, 1, S, S] in {0, 1}; None when the dataset has no masks
    has_mask: Tensor  # [N] bool: which images carry a pixel mask
    normal_pool: ImagePool | None = None  # [P] normal `train` images; None: not loaded
    image_split: str = "test"  # the dataset split `images` come from (provenance)
    reference_split: str = "train"  # the dataset split `references` come from (provenance)

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
        pool = self.normal_pool
        if pool is not None and tuple(pool.pixels.shape[1:]) != (3, *self.images.shape[-2:]):
            raise MethodError(f"{method} training data {self.name}: normal_pool images "
                              f"{tuple(pool.pixels.shape[1:])} must be [3, S, S] like the images")


class MethodError(ValueError):
    """A method was asked for something it cannot do (e.g. a branch the backbone lacks)."""


class AnomalyMethod(nn.Module):
    """Scores query images against a reference bank; trainable methods also `fit`."""

    name: str = "base"
    trainable: bool = False
    uses_normal_pool: bool = False  # fit() draws from CategoryTrainData.normal_pool: loaders fill it
    preprocess: str = "torch-bicubic"  # the residual_core.preprocess preset its inputs go through

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def score(self, images: Tensor, bank) -> ScoreOutput:  # bank: residual_core.bank.ReferenceBank
        raise NotImplementedError

    def set_normaliser(self):
        """None, or a `set_normalisation.SetNormaliser` when the method's maps need statistics of the
        whole evaluated set (then pipelines score with `score_raw` and finish per category)."""
        return None

    def score_raw(self, images: Tensor, bank) -> dict[str, Tensor]:
        """Per-image intermediate arrays for `set_normaliser().finish` (methods that have one)."""
        raise MethodError(f"method {self.name!r} has no set normalisation (score_raw)")

    def fit(self, data: Sequence[CategoryTrainData], log: LogFn | None = None) -> None:
        if self.trainable:
            raise NotImplementedError
        # training-free methods have nothing to fit

    def planned_steps(self, data: Sequence[CategoryTrainData]) -> int:
        """How many optimisation steps `fit(data)` takes (progress bars and ETAs); 0 when nothing is fit."""
        return 0

    def training_data_record(self, data: Sequence[CategoryTrainData]) -> dict[str, dict]:
        """Per category ("dataset/category"): which images `fit` uses, from which splits (for train logs)."""
        return {cat.name: {
            "images": {"count": int(cat.images.shape[0]), "split": cat.image_split,
                       "anomalous": int((cat.labels != 0).sum())},
            "references": {"count": int(cat.references.shape[0]), "split": cat.reference_split},
        } for cat in data}

    def config_dict(self) -> dict:
        """JSON-serialisable hyper-parameters (saved with checkpoints and results)."""
        return {}

    def save_checkpoint(self, directory: str | Path) -> None:
        raise MethodError(f"method {self.name!r} has no learnable parts to save")

    def load_checkpoint(self, directory: str | Path) -> None:
        raise MethodError(f"method {self.name!r} has no learnable parts to load")
