"""The real photographs the benchmark is cut from: files bundled in installed PyPI wheels.

Nothing is downloaded: every source is a file inside an installed package (scikit-image's bundled
images, scikit-learn's sample images). Datasets built from the same photos share a source group,
so leave-one-dataset-out never trains on the held-out dataset's photos.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SourcePhoto:
    package: str  # the installed top-level package that bundles the file
    relpath: str  # path inside that package
    license: str

    @property
    def source(self) -> str:
        """The value of the dataset's ``source`` column: package-relative path of the photo."""
        return f"{self.package}/{self.relpath}"


@dataclass(frozen=True)
class BenchCategory:
    dataset: str
    name: str
    photo: SourcePhoto
    crop_px: int  # side of a square crop in source pixels
    augment: Literal["hflip", "dihedral"]  # photos keep "up"; textures may rotate


@dataclass(frozen=True)
class BenchDataset:
    name: str
    source_group: str
    description: str


_CC0 = "CC0 1.0 (public domain dedication)"
_PD = "public domain"
_CC_BY = "CC BY 2.0 (attribution: see sklearn/datasets/images/README.txt)"

DATASETS: dict[str, BenchDataset] = {
    "textures": BenchDataset("textures", "skimage-textures",
                             "grayscale texture photographs (scikit-image)"),
    "photos": BenchDataset("photos", "photo-scenes",
                           "colour photographs of scenes and objects (scikit-image, scikit-learn)"),
    "elpv": BenchDataset("elpv", "elpv-cells",
                         "electroluminescence images of real solar cells with real defects (elpv-dataset)"),
}

PHOTO_CATEGORIES: tuple[BenchCategory, ...] = (
    BenchCategory("textures", "brick", SourcePhoto("skimage", "data/brick.png", _CC0), 128, "dihedral"),
    BenchCategory("textures", "grass", SourcePhoto("skimage", "data/grass.png", _CC0), 128, "dihedral"),
    BenchCategory("textures", "gravel", SourcePhoto("skimage", "data/gravel.png", _CC0), 128, "dihedral"),
    BenchCategory("photos", "coffee", SourcePhoto("skimage", "data/coffee.png", _CC0), 128, "hflip"),
    BenchCategory("photos", "rocket", SourcePhoto("skimage", "data/rocket.jpg", _PD), 128, "hflip"),
    BenchCategory("photos", "china", SourcePhoto("sklearn", "datasets/images/china.jpg", _CC_BY), 128,
                  "hflip"),
    BenchCategory("photos", "flower", SourcePhoto("sklearn", "datasets/images/flower.jpg", _CC_BY), 128,
                  "hflip"),
)


class SourceNotFoundError(FileNotFoundError):
    """A bundled source photo is missing (its package is not installed or ships without it)."""


def package_file(package: str, relpath: str) -> str:
    """Absolute path of a file bundled inside an installed package, without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceNotFoundError(f"{package}/{relpath}: package {package!r} is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], relpath)
    if not os.path.isfile(path):
        raise SourceNotFoundError(f"{package}/{relpath}: not bundled in the installed {package!r} package")
    return path


def load_photo(photo: SourcePhoto) -> np.ndarray:
    """The photo as uint8 [H, W, C] with C = 1 (grayscale) or 3 (RGB; alpha and palettes dropped)."""
    with Image.open(package_file(photo.package, photo.relpath)) as img:
        img = img.convert("L") if img.mode in ("L", "I;16", "I", "1") else img.convert("RGB")
        pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels
