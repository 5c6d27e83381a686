"""Shared builders for the Res2CLIP tests: tiny inputs, banks and generated training data."""

from __future__ import annotations

import torch

from residual_core.bank import build_bank
from residual_core.methods import CategoryTrainData


def make_bank(backbone, references: torch.Tensor, category: str = "widget"):
    ids = [f"ref{i}" for i in range(references.shape[0])]
    return build_bank(backbone, references, image_ids=ids, dataset="synthetic", category=category, seed=0)


def textured_images(count: int, size: int, seed: int) -> torch.Tensor:
    """A shared smooth pattern plus small noise: the 'normal' look of a synthetic category."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(
        torch.randn(1, 3, 8, 8, generator=generator), size=(size, size), mode="bilinear"
    )
    return base + 0.05 * torch.randn(count, 3, size, size, generator=generator)


def synthetic_category(
    name: str, size: int, count: int = 8, seed: int = 0, with_masks: bool = True
) -> CategoryTrainData:
    """Alternating normal / anomalous images; anomalies are a bright square with its mask."""
    images = textured_images(count + 2, size, seed)
    references, images = images[:2], images[2:].clone()
    labels = torch.tensor([i % 2 for i in range(count)])
    masks = torch.zeros(count, 1, size, size)
    lo, hi = size // 4, size // 2
    for i in range(count):
        if labels[i]:
            images[i, :, lo:hi, lo:hi] += 2.0
            masks[i, :, lo:hi, lo:hi] = 1.0
    has_mask = torch.full((count,), with_masks)
    return CategoryTrainData(
        "synthetic", name, references, images, labels, masks if with_masks else None, has_mask
    )
