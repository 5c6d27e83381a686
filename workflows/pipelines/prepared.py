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
    """One decoded image as it travels: uint8 [3, S, S] pixels (a channel-first view of the preset's
    picture, copied once, into the shard's array) or normalised float32 [3, S, S]."""
    if preset.EIGHT_BIT_EXACT:
        return preset.display(image, job.image_size).transpose(2, 0, 1)
    return preset.image(image, job.image_size, tuple(job.mean), tuple(job.std)).numpy()


def image_rows(preset, size: int, capacity: int) -> RowStack:
    """The shard's images [N, 3, S, S] in the preset's transport dtype, filled row by row."""
    return RowStack((IMAGE_CHANNELS, size, size), image_dtype(preset), capacity)


class RowStack:
    """Rows of one shape copied into one preallocated array as they come (doubled when full): each row is
    copied once, and no list of rows is stacked at the end."""

    def __init__(self, row_shape: tuple[int, ...], dtype, capacity: int) -> None:
        self._rows = np.empty((max(0, int(capacity)), *row_shape), dtype=dtype)
        self._count = 0

    def append(self, row: np.ndarray) -> None:
        if self._count == len(self._rows):
            grown = np.empty((max(1, 2 * len(self._rows)), *self._rows.shape[1:]), self._rows.dtype)
            grown[:self._count] = self._rows
            self._rows = grown
        self._rows[self._count] = row
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def array(self) -> np.ndarray:
        """[count, *row_shape], C-contiguous, its own memory (copied only when rows were left unused)."""
        return self._rows if self._count == len(self._rows) else self._rows[:self._count].copy()


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
