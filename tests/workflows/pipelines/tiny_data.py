"""A tiny dataset in the project's Parquet format: crops of real scikit-image photos, with pasted
dark/bright squares as defects (masks; defect types `dark`, `bright`) on test images; one dataset
without masks."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from workflows.datasets.writer import write_dataset

# dataset -> (source group, {category: skimage photo}, has masks)
TINY_LAYOUT = {
    "textures": ("g-tex", {"brick": "brick", "grass": "grass"}, True),
    "photos": ("g-photo", {"coffee": "coffee", "astronaut": "astronaut"}, True),
    "labels": ("g-photo", {"camera": "camera"}, False),
}
SIZE = 48
DEFECT_TYPES = {True: "bright", False: "dark"}  # two defect types: bright or dark pasted squares
# overrides for evaluating the tiny dataset quickly (64 px, one k, one seed, no MLflow)
EVAL_BASE = ["backbone.image_size=64", "index.shots=[1]", "index.seeds=[0]", "tracking.enabled=false",
             "data.datasets=[textures,labels]"]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def tiny_rows(n_train: int = 4, n_normal: int = 3, n_anomalous: int = 3, seed: int = 0,
              corrupt: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for dataset, (_, categories, has_masks) in TINY_LAYOUT.items():
        for category, photo in categories.items():
            image = _photo(photo)
            height, width = image.shape[:2]
            n = n_train + n_normal + n_anomalous
            for i in range(n):
                top, left = rng.integers(0, height - SIZE), rng.integers(0, width - SIZE)
                crop = image[top:top + SIZE, left:left + SIZE].copy()
                split = "train" if i < n_train else "test"
                label = 0 if i < n_train + n_normal else 1
                mask, defect_type = None, "good"
                if label:
                    y, x = rng.integers(4, SIZE - 14, size=2)
                    bright = rng.random() < 0.5
                    crop[y:y + 10, x:x + 10] = 255 if bright else 0
                    defect_type = DEFECT_TYPES[bright]
                    if has_masks:
                        mask_array = np.zeros((SIZE, SIZE), np.uint8)
                        mask_array[y:y + 10, x:x + 10] = 255
                        mask = _png(mask_array)
                rows.append({"dataset": dataset, "category": category, "split": split, "label": label,
                             "defect_type": defect_type, "image": _png(crop), "mask": mask,
                             "width": SIZE, "height": SIZE, "source": f"{photo}/{i}.png"})
    for i in range(corrupt):  # truncated PNGs in a test split
        rows.append({"dataset": "textures", "category": "brick", "split": "test", "label": 1,
                     "defect_type": "corrupt", "image": rows[0]["image"][:60] + bytes([i]), "mask": None,
                     "width": SIZE, "height": SIZE, "source": f"corrupt/{i}.png"})
    return rows


def write_tiny(dest_url: str, **kwargs) -> str:
    groups = {dataset: spec[0] for dataset, spec in TINY_LAYOUT.items()}
    write_dataset(tiny_rows(**kwargs), dest_url, extra_metadata={"source_groups": groups})
    return dest_url
