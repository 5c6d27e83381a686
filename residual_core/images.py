"""The one way to decode images and masks: bytes -> RGB PIL image / boolean mask -> tensors.

Decoding is defensive: empty, truncated and non-image input, and decompression bombs (checked from
the header, before any pixel is decoded) raise ``ImageDecodeError`` with a reason. Every mode
(grayscale, RGBA, 16-bit, palette, CMYK, ...) is normalised to 8-bit RGB here, on read, so the
stored bytes stay the originals. Like the authors' loaders, EXIF orientation is not applied.

Decode memory is bounded by ``max_pixels`` (checked on the declared size) times a few bytes per pixel:
high-bit-depth conversion works in row chunks. JPEGs can be decoded reduced (libjpeg's DCT scaling,
1/2, 1/4 or 1/8, via ``Image.draft``) by ``decode_image_reduced``: always to a given minimum size, or
only when the full size is over ``max_pixels``; other images decode exactly as ``decode_image``.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported lazily: ingest and archive scans decode without it
    import torch

DEFAULT_MAX_PIXELS = 64 * 2**20  # 64 Mpx; MVTec/VisA images are at most ~2 Mpx
JPEG_SCALES = (1, 2, 4, 8)  # the reductions libjpeg decodes directly (output size ceil(size / scale))
_CHUNK_PIXELS = 1 << 20  # high-bit-depth conversion works on about this many pixels at a time
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
    (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WebP"),
)


class ImageDecodeError(ValueError):
    """The bytes are not a usable image; ``reason`` says why (for quarantine reports)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _open(data: bytes, max_pixels: int, *, draft_size: tuple[int, int] | None = None,
          reduce_over_limit: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """Parse the header only and enforce the pixel limit before any pixel data is decoded.

    JPEG only: ``draft_size`` set -> decode at the largest DCT reduction that keeps both sides at least
    ``draft_size``; ``reduce_over_limit`` -> an image over ``max_pixels`` is decoded at the smallest
    reduction that fits instead of being refused. The limit applies to the size actually decoded.
    -> (image, original (width, height) from the header)."""
    if data is None or len(data) == 0:
        raise ImageDecodeError("empty input (zero bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(bytes(data)))
    except UnidentifiedImageError:
        known = next((name for sig, name in _SIGNATURES if bytes(data[: len(sig)]) == sig), None)
        if known:
            raise ImageDecodeError(f"truncated or corrupt {known} header") from None
        raise ImageDecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too large (decompression bomb guard): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means a bad file
        raise ImageDecodeError(f"truncated or corrupt header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"invalid size {width}x{height}")
    if image.format == "JPEG" and (draft_size is not None or reduce_over_limit):
        scale = jpeg_scale((width, height), max_pixels, draft_size=draft_size,
                           reduce_over_limit=reduce_over_limit)
        if scale > 1:
            # request exactly `scale` under PIL's rule (largest s with size // request >= s)
            image.draft(None, (max(1, width // scale), max(1, height // scale)))
    if image.size[0] * image.size[1] > max_pixels:
        reduced = "" if image.size == (width, height) else f" (reduced to {image.size[0]}x{image.size[1]})"
        raise ImageDecodeError(
            f"too large: {width}x{height} = {width * height} pixels{reduced} > max_pixels={max_pixels}"
        )
    return image, (width, height)


def jpeg_scale(size: tuple[int, int], max_pixels: int, *, draft_size: tuple[int, int] | None = None,
               reduce_over_limit: bool = False) -> int:
    """The DCT reduction (1, 2, 4 or 8) a JPEG of `size` is decoded at (see `_open`); 1 = full size."""
    width, height = size
    scale = 1
    if draft_size is not None:
        fits = [s for s in JPEG_SCALES if width // s >= draft_size[0] and height // s >= draft_size[1]]
        scale = max(fits, default=1)
    if reduce_over_limit:
        for s in JPEG_SCALES:
            if s >= scale and math.ceil(width / s) * math.ceil(height / s) <= max_pixels:
                return s
        return JPEG_SCALES[-1]  # still over the limit: refused on the reduced size
    return scale


def _load(image: Image.Image) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # noqa: BLE001 - truncated streams raise OSError/SyntaxError/ValueError
        raise ImageDecodeError(f"truncated or corrupt image data: {type(exc).__name__}: {exc}") from None
    return image


def probe_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header, with the same checks as decoding; fully decodes to catch
    truncation so ingest rejects what later decoding would reject."""
    image = _load(_open(data, max_pixels)[0])
    return image.size


def _high_bit_depth_to_uint8(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer and float grayscale -> 8-bit L (scaled, not clipped).

    Works on row chunks of about `_CHUNK_PIXELS` (the arithmetic is per pixel, so the result is the
    same as on the whole array): a few bytes per pixel instead of the ~30 of whole-array float64."""
    array = np.asarray(image)
    out = np.empty(array.shape, np.uint8)
    rows = max(1, _CHUNK_PIXELS // max(1, array.shape[1] if array.ndim > 1 else 1))
    chunks = [slice(start, start + rows) for start in range(0, array.shape[0], rows)]
    if image.mode == "F":
        highs = []
        for part in chunks:
            values = array[part].astype(np.float64)
            finite = values[np.isfinite(values)]
            if finite.size:
                highs.append(float(finite.max()))
        high = max(highs) if highs else 1.0
        scale = 255.0 if high <= 1.0 else 255.0 / max(high, 1e-12)
        for part in chunks:
            values = np.clip(np.nan_to_num(array[part].astype(np.float64)) * scale, 0, 255)
            out[part] = np.round(values).astype(np.uint8)
    else:
        bits = 16 if int(array.max(initial=0)) <= 0xFFFF else 32
        for part in chunks:
            values = np.clip(array[part].astype(np.int64), 0, None) / (2**bits - 1) * 255.0
            out[part] = np.round(values).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any PIL mode to 8-bit RGB (alpha is dropped; palette transparency too)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_uint8(image).convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")  # avoids the palette-transparency warning
    return image.convert("RGB")


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB PIL image (first frame of multi-frame files)."""
    return decode_image_reduced(data, max_pixels=max_pixels)[0]


def decode_image_reduced(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                         draft_size: tuple[int, int] | None = None,
                         reduce_over_limit: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image` with optional reduced JPEG decoding (see `_open`); -> (RGB image, original
    (width, height) from the header). Without reduction the image is exactly `decode_image`'s."""
    image, original = _open(data, max_pixels, draft_size=draft_size, reduce_over_limit=reduce_over_limit)
    image = _load(image)
    try:
        return to_rgb(image), original
    except Exception as exc:  # noqa: BLE001 - exotic modes PIL cannot convert
        raise ImageDecodeError(f"unsupported image mode {image.mode!r}: {exc}") from None


def decode_mask(data: bytes, size: tuple[int, int] | None = None, *,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask into a boolean array [H, W]: any nonzero pixel is anomalous (as the authors do).

    ``size`` is the (width, height) of the image the mask belongs to; a different size is an error."""
    image = _load(_open(data, max_pixels)[0])
    if size is not None and tuple(image.size) != tuple(size):
        raise ImageDecodeError(
            f"mask size {image.size[0]}x{image.size[1]} differs from image size {size[0]}x{size[1]}"
        )
    if image.mode == "P":
        image = image.convert("L")
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., :3].max(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
    return array != 0


def image_to_tensor(image: Image.Image, size: int | tuple[int, int],
                    mean: tuple[float, float, float] = IMAGENET_MEAN,
                    std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor [3, H, W], resized (bicubic, antialiased) to ``size``
    (an int means a square S x S, as the authors' ``Resize((S, S))``)."""
    import torch
    import torch.nn.functional as F

    height, width = (size, size) if isinstance(size, int) else size
    rgb = to_rgb(image)
    tensor = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    if tensor.shape[1:] != (height, width):
        tensor = F.interpolate(tensor[None], size=(height, width), mode="bicubic", antialias=True,
                               align_corners=False)[0].clamp_(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=tensor.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=tensor.dtype).view(3, 1, 1)
    return (tensor - mean_t) / std_t


def mask_to_tensor(mask: np.ndarray | None, size: int | tuple[int, int]) -> torch.Tensor:
    """Boolean mask [H, W] (or None = all normal) -> float tensor [1, H', W'] in {0, 1},
    resized with nearest neighbour like the authors' mask transforms."""
    import torch
    import torch.nn.functional as F

    height, width = (size, size) if isinstance(size, int) else size
    if mask is None:
        return torch.zeros(1, height, width)
    tensor = torch.from_numpy(np.asarray(mask, dtype=bool).astype(np.float32))[None, None]
    if tensor.shape[2:] != (height, width):
        tensor = F.interpolate(tensor, size=(height, width), mode="nearest")
    return tensor[0]


def decode_image_tensor(data: bytes, size: int | tuple[int, int],
                        mean: tuple[float, float, float] = IMAGENET_MEAN,
                        std: tuple[float, float, float] = IMAGENET_STD, *,
                        max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Shortcut: encoded bytes -> normalised tensor [3, S, S]."""
    return image_to_tensor(decode_image(data, max_pixels=max_pixels), size, mean, std)


def decode_mask_tensor(data: bytes | None, size: int | tuple[int, int],
                       image_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Shortcut: PNG mask bytes (or None) -> float tensor [1, S, S] in {0, 1}."""
    return mask_to_tensor(None if data is None else decode_mask(data, image_size), size)
