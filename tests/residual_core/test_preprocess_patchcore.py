"""The `patchcore` preset equals PatchCore's dataset transforms (`datasets/mvtec.py`: Resize(resize),
CenterCrop(imagesize), ToTensor, Normalize; masks the same without Normalize, then `astype(int)` in their
metrics), rebuilt here with torchvision, not copied."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

T = pytest.importorskip("torchvision.transforms")

from residual_core.images import decode_image, decode_mask  # noqa: E402
from residual_core.preprocess import PREPROCESS_NAMES, View, get_preprocess  # noqa: E402

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHAPES = [(64, 64), (45, 77), (77, 45), (33, 50), (20, 27), (96, 64)]


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _photo(shape, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    base = 127 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0)
    rgb = np.stack([base + rng.normal(0, 30, shape) + 20 * c for c in range(3)], -1)
    return _png(np.clip(rgb, 0, 255).astype(np.uint8))


def _mask(shape, seed=1) -> bytes:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        mask[y:y + rng.integers(2, 14), x:x + rng.integers(2, 14)] = 255
    mask[rng.random(shape) < 0.03] = 255
    return _png(mask)


def _resize(size: int) -> int:
    return round(size * 256 / 224)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [32, 56])
def test_image_equals_their_transform(shape, size):
    data = _photo(shape)
    transform = T.Compose([T.Resize(_resize(size)), T.CenterCrop(size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = transform(Image.open(io.BytesIO(data)).convert("RGB"))
    got = get_preprocess("patchcore").image(decode_image(data), size, IMAGENET_MEAN, IMAGENET_STD)
    assert got.shape == (3, size, size) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_equals_their_transform_cast_to_int(shape):
    data = _mask(shape)
    resized = T.Compose([T.Resize(_resize(32)), T.CenterCrop(32), T.ToTensor()])(Image.open(io.BytesIO(data)))
    expected = torch.from_numpy(resized.numpy().astype(int)).float()  # metrics.py: .astype(int)
    got = get_preprocess("patchcore").mask(decode_mask(data, shape[::-1]), 32)
    assert got.shape == (1, 32, 32) and torch.equal(got, expected)
    assert set(got.unique().tolist()) <= {0.0, 1.0}


def test_their_two_resolutions_and_the_view():
    preset = get_preprocess("patchcore")
    assert "patchcore" in PREPROCESS_NAMES
    assert preset.short_side(224) == 256 and preset.short_side(320) == 366  # sample_training.sh
    assert preset.view((256, 256), 224) == View(16.0, 16.0, 224.0, 224.0)  # 256 -> crop 16 px each side
    wide = preset.view((448, 224), 224)  # resized 512 x 256, crop from (144, 16), scale 7/8
    assert wide == View(144 * 448 / 512, 16 * 224 / 256, 224 * 448 / 512, 224 * 224 / 256)
    assert torch.equal(preset.mask(None, 16), torch.zeros(1, 16, 16))
    assert get_preprocess("resad").short_side(224) == 224  # the resad preset is unchanged
