"""A prepared shard as it crosses Ray, from the preparing CPU task to the scoring actor.

Ray Data numpy columns, no pickled blob: `images` [N, 3, S, S], `masks` [N, S, S] uint8 (evaluate
only), and the row metadata (`kept`, `skipped`) as one JSON string column `rows`. Images travel as the
preset's 8-bit pixels (uint8, a quarter of float32's bytes) when the preset says its `image()` is
exactly those pixels normalised (`Preprocess.EIGHT_BIT_EXACT`); the actor normalises them on the
method's device (`residual_core.preprocess.normalise_uint8`). Other presets (`torch-bicubic`) send the
normalised float32 images as before. Either way the model sees the same float32 input, bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

IMAGE_CHANNELS = 3


def image_dtype(preset) -> np.dtype:
    """The dtype a preset's images travel in: uint8 pixels where that is exact, else float32."""
    return np.dtype(np.uint8) if preset.EIGHT_BIT_EXACT else np.dtype(np.float32)


def image_input(preset, image, job) -> np.ndarray:
    """One decoded image as it travels: uint8 [3, S, S] pixels or normalised float32 [3, S, S]."""
    if preset.EIGHT_BIT_EXACT:
        return preset.pixels_chw(image, job.image_size)
    return preset.image(image, job.image_size, tuple(job.mean), tuple(job.std)).numpy()


def stack_images(images: list[np.ndarray], preset, size: int) -> np.ndarray:
    """[N, 3, S, S] of the preset's transport dtype; [0, 3, S, S] for a shard with nothing kept."""
    if images:
        return np.stack(images)
    return np.zeros((0, IMAGE_CHANNELS, size, size), image_dtype(preset))


def model_input(images: np.ndarray, mean, std, device: str = "cpu"):
    """Prepared images (either transport) -> the model's normalised float32 tensor on `device`."""
    import torch

    from residual_core.preprocess import normalise_uint8

    batch = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    if batch.dtype == torch.uint8:
        return normalise_uint8(batch, tuple(mean), tuple(std))
    return batch


@dataclass
class PreparedShard:
    """One shard's preprocessed inputs and its rows (kept in image order, and the skipped)."""

    images: np.ndarray  # uint8 pixels or normalised float32, [N, 3, S, S]
    kept: list[dict]
    skipped: list[dict]
    masks: np.ndarray | None = None  # uint8 [N, S, S]; scan has none

    def to_row(self, task: dict) -> dict:
        """The Ray Data row: the task's job and shard, the arrays and the rows as JSON."""
        row = {"job": task["job"], "shard": task["shard"], "images": self.images,
               "rows": json.dumps({"kept": self.kept, "skipped": self.skipped})}
        if self.masks is not None:
            row["masks"] = self.masks
        return row

    @classmethod
    def from_row(cls, row: dict) -> PreparedShard:
        """The actor's side of `to_row` (arrays made writable: Ray hands out read-only views)."""
        rows = json.loads(row["rows"])
        masks = row.get("masks")
        return cls(_writable(row["images"]), rows["kept"], rows["skipped"],
                   None if masks is None else _writable(masks))


def _writable(array) -> np.ndarray:
    return np.require(np.asarray(array), requirements=["C", "W"])
