"""Decoding: every image mode normalised to RGB, every bad input a clear ImageDecodeError."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from residual_core.images import (
    ImageDecodeError,
    decode_image,
    decode_image_tensor,
    decode_mask,
    decode_mask_tensor,
    image_to_tensor,
    mask_to_tensor,
    probe_size,
)

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (10, 14, 3), dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (lambda: Image.fromarray(RGB), "PNG"),
        (lambda: Image.fromarray(RGB).convert("L"), "PNG"),
        (lambda: Image.fromarray(RGB).convert("RGBA"), "PNG"),
        (lambda: Image.fromarray(RGB).convert("LA"), "PNG"),
        (lambda: Image.fromarray(RGB).convert("P"), "PNG"),
        (lambda: Image.fromarray(RGB).convert("1"), "PNG"),
        (lambda: Image.fromarray(RGB).convert("CMYK"), "JPEG"),
        (lambda: Image.fromarray(RGB).convert("CMYK"), "TIFF"),
        (lambda: Image.fromarray(RGB[..., 0].astype(np.uint16) * 257), "PNG"),  # 16-bit grayscale
        (lambda: Image.fromarray(RGB[..., 0].astype(np.float32) / 255), "TIFF"),
        (lambda: Image.fromarray(RGB), "JPEG"),
        (lambda: Image.fromarray(RGB), "BMP"),
    ],
)
def test_every_mode_decodes_to_8bit_rgb_of_the_same_size(make, fmt):
    image = decode_image(encode(make(), fmt))
    assert image.mode == "RGB" and image.size == (14, 10)


def test_16bit_grayscale_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 14 * 10).astype(np.uint16).reshape(10, 14)
    decoded = np.asarray(decode_image(encode(Image.fromarray(ramp))))
    assert decoded[..., 0].min() == 0 and decoded[..., 0].max() == 255
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_palette_with_transparency_decodes_without_warning(recwarn):
    image = Image.fromarray(RGB).convert("P")
    image.info["transparency"] = 0
    assert decode_image(encode(image)).mode == "RGB"
    assert not [w for w in recwarn if "ransparency" in str(w.message)]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"this is a text file, not an image", "not an image"),
        (encode(Image.fromarray(RGB))[:60], "truncated"),
        (encode(Image.fromarray(RGB), "JPEG")[:200], "truncated"),
    ],
)
def test_bad_inputs_raise_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert reason in info.value.reason


def test_decompression_bomb_is_rejected_from_the_header():
    bomb = encode(Image.new("1", (12000, 12000)))  # 144 Mpx, a few kB encoded
    assert len(bomb) < 100_000
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(bomb)
    with pytest.raises(ImageDecodeError, match="max_pixels=100"):
        decode_image(encode(Image.fromarray(RGB)), max_pixels=100)


def test_probe_size_checks_the_whole_file():
    data = encode(Image.fromarray(RGB))
    assert probe_size(data) == (14, 10)
    with pytest.raises(ImageDecodeError):
        probe_size(data[: len(data) // 2])


def test_decode_mask_nonzero_is_anomalous_and_size_is_checked():
    values = np.zeros((10, 14), np.uint8)
    values[2:4, 3:6] = 1  # VisA-style 0/1 masks count too
    values[7, 7] = 255
    mask = decode_mask(encode(Image.fromarray(values)), (14, 10))
    assert mask.dtype == bool and mask.shape == (10, 14) and mask.sum() == 7
    with pytest.raises(ImageDecodeError, match="differs from image size"):
        decode_mask(encode(Image.fromarray(values)), (20, 10))
    rgb_mask = decode_mask(encode(Image.fromarray(np.stack([values * 255] * 3, -1))))
    assert rgb_mask.sum() == 7


def test_image_and_mask_tensors():
    image = Image.fromarray(RGB)
    tensor = image_to_tensor(image, 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    assert tensor.shape == (3, 8, 8) and tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0
    same = image_to_tensor(image, (10, 14), mean=(0, 0, 0), std=(1, 1, 1))
    torch.testing.assert_close(same, torch.from_numpy(RGB).permute(2, 0, 1).float() / 255)
    assert decode_image_tensor(encode(image), 8).shape == (3, 8, 8)
    mask = np.zeros((10, 14), bool)
    mask[:5] = True
    mask_tensor = mask_to_tensor(mask, 6)
    assert mask_tensor.shape == (1, 6, 6) and set(mask_tensor.unique().tolist()) <= {0.0, 1.0}
    assert mask_to_tensor(None, 6).sum() == 0
    assert decode_mask_tensor(None, 4).shape == (1, 4, 4)
