"""The one resize + encode path every benchmark image goes through, normal or defective alike."""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.LANCZOS


def derive_seed(seed: int, *keys: str | int) -> int:
    """A stable 63-bit seed for one purpose (e.g. one sample) of a run with ``seed``."""
    words = [zlib.crc32(str(key).encode()) for key in keys]
    state = np.random.SeedSequence(entropy=seed, spawn_key=tuple(words)).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *keys))


def _output_size(height: int, width: int, output_px: int | None) -> tuple[int, int]:
    return (width, height) if output_px is None else (output_px, output_px)


def resize_pixels(pixels: np.ndarray, output_px: int | None) -> Image.Image:
    """uint8 [h, w, C] (C = 1 or 3) -> PIL image at the output size."""
    mode_pixels = pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    img = Image.fromarray(np.ascontiguousarray(mode_pixels))
    return img.resize(_output_size(*pixels.shape[:2], output_px), RESAMPLE)


def encode_png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def finish_image(pixels: np.ndarray, output_px: int | None) -> tuple[bytes, Image.Image]:
    """Resize then PNG-encode; returns the bytes and the resized image (for statistics)."""
    img = resize_pixels(pixels, output_px)
    return encode_png(img), img


def finish_mask(alpha: np.ndarray, output_px: int | None) -> tuple[np.ndarray, bytes]:
    """Resample the opacity map like the image; mask = opacity >= 0.5 -> (bool [S, S], PNG bytes)."""
    img = Image.fromarray(np.ascontiguousarray(alpha, dtype=np.float32))
    resized = np.asarray(img.resize(_output_size(*alpha.shape, output_px), RESAMPLE))
    mask = resized >= 0.5
    return mask, encode_png(Image.fromarray((mask * 255).astype(np.uint8)))
