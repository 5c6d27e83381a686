"""Small generated rows for dataset tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def png_bytes(seed: int, size: tuple[int, int] = (12, 8), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()


def make_row(seed: int, *, dataset: str = "ds", category: str = "cat", split: str = "train",
             label: int | None = 0, with_mask: bool = False) -> dict:
    mask = None
    if with_mask:
        buffer = io.BytesIO()
        Image.fromarray((np.arange(96).reshape(8, 12) % 2 * 255).astype(np.uint8)).save(buffer, "PNG")
        mask = buffer.getvalue()
    return {
        "dataset": dataset, "category": category, "split": split, "label": label,
        "defect_type": "good" if label == 0 else ("crack" if label == 1 else None),
        "image": png_bytes(seed), "mask": mask, "width": 12, "height": 8, "source": f"{category}/{seed}.png",
    }
