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
    decode_image_reduced,
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


def test_high_bit_depth_conversion_in_chunks_equals_the_whole_array(monkeypatch):
    import residual_core.images as images

    values = RNG.integers(0, 65536, (97, 31), dtype=np.uint16)
    floats = RNG.normal(0, 300, (97, 31)).astype(np.float32)
    floats[3, 4], floats[50, 7], floats[90, 30] = np.nan, np.inf, -np.inf
    wide = values.astype(np.int32) * 40000  # 32-bit, some wrapped negative
    cases = [Image.fromarray(values), Image.fromarray(wide), Image.fromarray(floats)]
    whole = [np.asarray(images._high_bit_depth_to_uint8(image)) for image in cases]
    monkeypatch.setattr(images, "_CHUNK_PIXELS", 100)  # 3 rows per chunk
    for image, expected in zip(cases, whole, strict=True):
        assert np.array_equal(np.asarray(images._high_bit_depth_to_uint8(image)), expected), image.mode


def test_jpeg_reduced_decoding_only_where_asked_and_same_result_elsewhere():
    photo = Image.fromarray(RNG.integers(0, 256, (400, 600, 3), dtype=np.uint8))
    jpeg, png = encode(photo, "JPEG"), encode(photo, "PNG")
    for data in (jpeg, png):  # under the limit, no draft: exactly decode_image
        image, original = decode_image_reduced(data, max_pixels=600 * 400, reduce_over_limit=True)
        assert original == (600, 400) and np.array_equal(np.asarray(image), np.asarray(decode_image(data)))
    image, original = decode_image_reduced(jpeg, max_pixels=200 * 150, reduce_over_limit=True)
    assert image.size == (150, 100) and original == (600, 400)  # DCT 1/4: the least reduction that fits
    image, original = decode_image_reduced(jpeg, draft_size=(128, 128))
    assert image.size == (300, 200) and original == (600, 400)  # 1/2: the most keeping >= 128 a side
    with pytest.raises(ImageDecodeError, match=r"too large: 600x400 = 240000 pixels \(reduced to 75x50\)"):
        decode_image_reduced(jpeg, max_pixels=1000, reduce_over_limit=True)  # even 1/8 is too large
    with pytest.raises(ImageDecodeError, match="too large"):  # PNG cannot be decoded reduced
        decode_image_reduced(png, max_pixels=200 * 150, reduce_over_limit=True)


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
