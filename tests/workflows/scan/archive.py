"""A generated image archive for scan tests: 64 px crops of scikit-image photos, some with pasted
defects, plus bad inputs; references and held-out normals in <category>/<images> folders."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

PHOTOS = {"brick": "brick", "grass": "grass"}  # categories with references
NO_REFERENCES = "gravel"  # a category in the archive without references
SIZE = 64
DEFECT = 20


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _crop(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    top, left = rng.integers(0, photo.shape[0] - SIZE), rng.integers(0, photo.shape[1] - SIZE)
    return photo[top:top + SIZE, left:left + SIZE].copy()


def _paste_defect(crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A saturated colour square (a stain no normal crop has); returns the crop and its box x0,y0,x1,y1."""
    top, left = rng.integers(4, SIZE - DEFECT - 4, size=2)
    crop[top:top + DEFECT, left:left + DEFECT] = (255, 0, 255) if rng.random() < 0.5 else (0, 255, 255)
    return crop, (int(left), int(top), int(left + DEFECT), int(top + DEFECT))


@dataclass
class Archive:
    root: str
    images: dict[str, dict] = field(default_factory=dict)  # key -> {"category", "defect": box | None}
    bad: dict[str, str] = field(default_factory=dict)  # key -> expected reason fragment

    def keys(self) -> list[str]:
        return sorted([*self.images, *self.bad])


def _write(root: str, key: str, data: bytes) -> None:
    path = os.path.join(root, *key.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(data)


def write_archive(root: str, *, per_category: int, defect_every: int = 10, seed: int = 0,
                  bad: bool = True, no_reference_images: int = 5) -> Archive:
    """`per_category` images for each category with references (every `defect_every`-th with a
    defect), a few of a category without references, and (optionally) the bad inputs."""
    rng = np.random.default_rng(seed)
    archive = Archive(root)
    for category, photo_name in PHOTOS.items():
        photo = _photo(photo_name)
        for i in range(per_category):
            crop, box = _crop(photo, rng), None
            if i % defect_every == defect_every - 1:
                crop, box = _paste_defect(crop, rng)
            key = f"{category}/{i // 500:03d}/img-{i:05d}.png"
            _write(root, key, _png(crop))
            archive.images[key] = {"category": category, "defect": box}
    gravel = _photo("gravel")
    for i in range(no_reference_images):
        key = f"{NO_REFERENCES}/img-{i:05d}.png"
        _write(root, key, _png(_crop(gravel, rng)))
        archive.bad[key] = "no references"
    if bad:
        good = _png(_crop(_photo("brick"), rng))
        cases = {
            "brick/bad/zero.png": (b"", "empty input"),
            "brick/bad/notes.txt": (b"not an image at all\n" * 4, "not an image"),
            "brick/bad/truncated.png": (good[: len(good) // 2], "truncated"),
            "brick/bad/huge.png": (_png(np.zeros((640, 640, 3), np.uint8)), "too large"),
        }
        for key, (data, reason) in cases.items():
            _write(root, key, data)
            archive.bad[key] = reason
    return archive


def write_normals(root: str, count: int, seed: int) -> None:
    """`count` normal crops per category with references (references or held-out normals)."""
    rng = np.random.default_rng(seed)
    for category, photo_name in PHOTOS.items():
        photo = _photo(photo_name)
        for i in range(count):
            _write(root, f"{category}/n-{i:04d}.png", _png(_crop(photo, rng)))


def upload(local_root: str, url: str) -> None:
    """Copy a local tree under an s3:// prefix (test setup)."""
    from workflows import storage

    for directory, _, files in os.walk(local_root):
        for name in files:
            path = os.path.join(directory, name)
            rel = os.path.relpath(path, local_root).replace(os.sep, "/")
            with open(path, "rb") as handle:
                storage.atomic_write_bytes(storage.join(url, rel), handle.read())


def overlay_files(store) -> set[str]:
    """Overlay PNG files under a scan's maps/ (a `ScanStore`), as paths relative to the scan output."""
    from workflows import storage

    root = storage.join(store.url, "maps")
    return {"maps/" + url[len(root):].lstrip("/") for url in storage.list_urls(root, recursive=True)
            if url.endswith(".png")}
