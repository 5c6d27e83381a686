"""Preprocessing presets: a decoded image (and its mask) -> the model's S x S input, as each method's
authors prepare it. Every method declares one by name in its config (`preprocess`); every pipeline
(banks, training, evaluation, scan, reports) uses the method's preset for images and masks alike.

- `res2clip` (Res2CLIP `utils/utils.py:get_transform`, `test.py`): image: PIL bicubic resize of the
  whole image to S x S (8-bit result), `ToTensor`, normalise. Mask: PIL bilinear resize of the 0/255
  mask to S x S, then `/255 > 0.5`.
- `resad` (ResAD `datasets/mvtec.py`, `datasets/visa.py`, `img_size = crp_size = msk_size = 224`):
  image: PIL bicubic resize of the shorter side to S (longer side `int(S * long / short)`), centre
  crop S x S, `ToTensor`, normalise. Mask: PIL nearest resize of the shorter side to S, same crop.
- `patchcore` (PatchCore `datasets/mvtec.py`, `resize=256`, `imagesize=224`): image: PIL bilinear
  (torchvision's default) resize of the shorter side to round(S * 256 / 224) (256 for S = 224, 366 for
  their S = 320 runs), centre crop S x S, `ToTensor`, normalise. Mask: the same bilinear resize and
  crop; a pixel is anomalous only where the resized mask is exactly 255 (their metrics cast the [0, 1]
  mask with `astype(int)`).
- `torch-bicubic` (the project's earlier fast path, `residual_core.images.image_to_tensor`): one float
  torch bicubic antialiased resize of the whole image to S x S, normalise; masks torch nearest.

Mean and std come from the backbone (`Backbone.mean/std`); both authors normalise with their
backbone's constants (OpenAI CLIP for CLIP / ImageBind, ImageNet for wide_resnet50_2).
Images are decoded to 8-bit RGB by `residual_core.images.decode_image` first (the one decoding place);
masks are boolean arrays from `decode_mask` (nonzero = anomalous). `View` says which part of the
original image the S x S input shows, so a box on the model's grid maps back to original pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from residual_core.images import IMAGENET_MEAN, IMAGENET_STD, image_to_tensor, mask_to_tensor, to_rgb

if TYPE_CHECKING:  # torch is imported lazily, as in residual_core.images
    import torch

Mean = tuple[float, float, float]
UINT8_LEVELS = 256
HALF_LEVEL = 127  # 8-bit levels above it are > 0.5 after ToTensor's / 255


class PreprocessError(ValueError):
    """An unknown preset name or an unusable size."""


@dataclass(frozen=True)
class View:
    """The rectangle of the original image that the model's S x S input shows, in original pixels.

    Model pixel column c (of S) covers x in [left + c * width / S, left + (c + 1) * width / S); rows
    likewise with top / height. A whole-image preset has View(0, 0, image width, image height)."""

    left: float
    top: float
    width: float
    height: float

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.left, self.top, self.width, self.height)


class Preprocess:
    """One preset. Subclasses define the geometry and the resampling; `image`/`mask` are the contract."""

    name: str = ""
    # `image()` is `normalise_uint8(pixels_chw())` bit for bit, so the pipelines may carry the 8-bit
    # pixels between processes (a quarter of float32's bytes) and normalise where the model runs
    EIGHT_BIT_EXACT: bool = True

    def view(self, original_size: tuple[int, int], size: int) -> View:
        """Which part of an image of `original_size` = (width, height) the S x S input shows."""
        width, height = original_size
        return View(0.0, 0.0, float(width), float(height))

    def pixels(self, image: Image.Image, size: int) -> Image.Image:
        """The 8-bit RGB S x S picture the model sees (before ToTensor and normalisation)."""
        raise NotImplementedError

    def image(self, image: Image.Image, size: int, mean: Mean = IMAGENET_MEAN,
              std: Mean = IMAGENET_STD) -> torch.Tensor:
        """Decoded image -> normalised float32 tensor [3, S, S] (ToTensor then Normalize)."""
        import torch

        return normalise_uint8(torch.from_numpy(self.pixels_chw(image, size)), mean, std)

    def pixels_chw(self, image: Image.Image, size: int) -> np.ndarray:
        """uint8 [3, S, S]: `pixels` channel-first, the 8-bit form of the model input."""
        return self.display(image, size).transpose(2, 0, 1).copy()  # copy: C-contiguous, writable

    def mask(self, mask: np.ndarray | None, size: int) -> torch.Tensor:
        """Boolean mask [H, W] (None: all normal) -> float32 tensor [1, S, S] in {0, 1}."""
        import torch

        return torch.from_numpy(self.mask_array(mask, size)).float()[None]

    def mask_array(self, mask: np.ndarray | None, size: int) -> np.ndarray:
        """Boolean mask [H, W] (None: all normal) -> bool [S, S]: `mask()` without torch, the form
        the decode tasks ship (no per-image tensor work there)."""
        size = _check_size(size)
        if mask is None:
            return np.zeros((size, size), dtype=bool)
        return self.resampled_mask(mask, size)

    def resampled_mask(self, mask: np.ndarray, size: int) -> np.ndarray:
        """A given mask [H, W] -> bool [S, S], as the preset's authors resample and threshold it."""
        raise NotImplementedError

    def display(self, image: Image.Image, size: int) -> np.ndarray:
        """uint8 [S, S, 3]: the model's view of the image, to show under its anomaly map."""
        return np.asarray(self.pixels(to_rgb(image), _check_size(size)), dtype=np.uint8)


class SquarePil(Preprocess):
    """Res2CLIP: `Resize((S, S), BICUBIC)` on the PIL image (then a no-op `CenterCrop(S)`); masks
    `Resize((S, S))` (torchvision's default, bilinear) and thresholded at 0.5 after `ToTensor`."""

    name = "res2clip"

    def pixels(self, image: Image.Image, size: int) -> Image.Image:
        return _pil_resize(image, (size, size), Image.Resampling.BICUBIC)

    def resampled_mask(self, mask: np.ndarray, size: int) -> np.ndarray:
        resized = _pil_resize(_mask_image(mask), (size, size), Image.Resampling.BILINEAR)
        # ToTensor's level / 255 (float32) > 0.5 holds exactly for the levels above 127
        return np.asarray(resized) > HALF_LEVEL


class ShortSideCropPil(Preprocess):
    """ResAD: `Resize(S, BICUBIC)` (shorter side to S) then `CenterCrop(S)`; masks `Resize(S, NEAREST)`
    then the same `CenterCrop(S)`."""

    name = "resad"

    def short_side(self, size: int) -> int:
        """The shorter side after the resize, for an S x S crop (ResAD: S itself)."""
        return size

    @staticmethod
    def resized_size(original_size: tuple[int, int], size: int) -> tuple[int, int]:
        """(width, height) after the shorter side goes to S (torchvision's rule: int(S * long / short))."""
        width, height = original_size
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(size * long / short)
        return (size, new_long) if width <= height else (new_long, size)

    @staticmethod
    def crop_origin(resized: tuple[int, int], size: int) -> tuple[int, int]:
        """(left, top) of the centre crop in the resized image (torchvision: int(round((n - S) / 2)))."""
        width, height = resized
        return int(round((width - size) / 2.0)), int(round((height - size) / 2.0))

    def view(self, original_size: tuple[int, int], size: int) -> View:
        size = _check_size(size)
        width, height = original_size
        resized = self.resized_size(original_size, self.short_side(size))
        left, top = self.crop_origin(resized, size)
        sx, sy = width / resized[0], height / resized[1]
        return View(left * sx, top * sy, size * sx, size * sy)

    def _geometry(self, image: Image.Image, size: int, resample) -> Image.Image:
        resized = _pil_resize(image, self.resized_size(image.size, self.short_side(size)), resample)
        left, top = self.crop_origin(resized.size, size)
        return resized.crop((left, top, left + size, top + size))

    IMAGE_RESAMPLE = Image.Resampling.BICUBIC
    MASK_RESAMPLE = Image.Resampling.NEAREST

    @staticmethod
    def mask_pixels(resampled: np.ndarray) -> np.ndarray:
        """Which resampled mask pixels count as anomalous (ResAD: nonzero)."""
        return resampled != 0

    def pixels(self, image: Image.Image, size: int) -> Image.Image:
        return self._geometry(image, size, self.IMAGE_RESAMPLE)

    def resampled_mask(self, mask: np.ndarray, size: int) -> np.ndarray:
        return self.mask_pixels(np.asarray(self._geometry(_mask_image(mask), size, self.MASK_RESAMPLE)))


class PatchCorePil(ShortSideCropPil):
    """PatchCore: `Resize(resize)` (bilinear, shorter side) then `CenterCrop(imagesize)` with their
    256 / 224 (and 366 / 320): the shorter side goes to round(S * 256 / 224). Masks: the same
    `Resize` + `CenterCrop` (bilinear), `ToTensor`; their metrics then take `astype(int)`, so only pixels
    that stay exactly 255 count as anomalous."""

    name = "patchcore"
    RESIZE, IMAGESIZE = 256, 224  # their dataset defaults (bin/run_patchcore.py, datasets/mvtec.py)

    def short_side(self, size: int) -> int:
        return int(round(size * self.RESIZE / self.IMAGESIZE))  # never a .5 tie: 8S/7 is not n + 1/2

    IMAGE_RESAMPLE = Image.Resampling.BILINEAR
    MASK_RESAMPLE = Image.Resampling.BILINEAR

    @staticmethod
    def mask_pixels(resampled: np.ndarray) -> np.ndarray:
        return resampled == 255  # their `astype(int)` of the ToTensor mask: only full 255 counts


class TorchBicubic(Preprocess):
    """The fast path: `residual_core.images.image_to_tensor` / `mask_to_tensor` (float torch bicubic,
    antialiased, whole image to S x S; masks nearest). Not either author's resampling."""

    name = "torch-bicubic"
    EIGHT_BIT_EXACT = False  # a float resize: its 8-bit `pixels` are rounded, not what `image` gives

    def image(self, image: Image.Image, size: int, mean: Mean = IMAGENET_MEAN,
              std: Mean = IMAGENET_STD) -> torch.Tensor:
        return image_to_tensor(image, _check_size(size), mean, std)

    def resampled_mask(self, mask: np.ndarray, size: int) -> np.ndarray:
        return mask_to_tensor(mask, size)[0].numpy() > 0.5

    def pixels(self, image: Image.Image, size: int) -> Image.Image:
        import torch

        unit = image_to_tensor(image, _check_size(size), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        array = unit.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
        return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


_PRESETS: dict[str, Preprocess] = {
    p.name: p for p in (SquarePil(), ShortSideCropPil(), TorchBicubic(), PatchCorePil())
}
PREPROCESS_NAMES: tuple[str, ...] = tuple(_PRESETS)


def get_preprocess(name: str) -> Preprocess:
    """The preset called `name`; an unknown name raises PreprocessError listing the choices."""
    try:
        return _PRESETS[name]
    except (KeyError, TypeError):
        raise PreprocessError(f"unknown preprocess preset {name!r}; choose from {PREPROCESS_NAMES}") from None


# ----------------------------------------------------------------------------- helpers
def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise PreprocessError(f"size must be a positive int (the model's S x S input), got {size!r}")
    return int(size)


def _pil_resize(image: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    """`image.resize` as torchvision calls it on PIL input (PIL always antialiases bilinear/bicubic)."""
    if image.size == tuple(size):  # torchvision returns the input unchanged when the size already fits
        return image
    return image.resize(tuple(size), resample)


def _mask_image(mask: np.ndarray) -> Image.Image:
    """Boolean mask -> 8-bit L image 0/255, the form both authors' mask transforms receive."""
    array = np.asarray(mask)
    if array.ndim != 2:
        raise PreprocessError(f"mask must be a 2-D array [H, W], got shape {array.shape}")
    return Image.fromarray((array != 0).astype(np.uint8) * 255, mode="L")


def normalise_uint8(pixels: torch.Tensor, mean: Mean, std: Mean) -> torch.Tensor:
    """uint8 pixels [..., 3, S, S] (one image or a batch, any device) -> normalised float32 on the same
    device: ToTensor's `/ 255` then Normalize. The 3 x 256 possible values are computed once on the CPU
    and looked up, so the result is the same bits on every device (a GPU may divide by a scalar as a
    multiplication by its reciprocal)."""
    import torch

    table = _normalised_levels(tuple(mean), tuple(std)).to(pixels.device)
    channels = torch.arange(table.shape[0], device=pixels.device).view(-1, 1, 1)
    return table[channels, pixels.long()]


def _normalised_levels(mean: Mean, std: Mean) -> torch.Tensor:
    """[3, 256] float32: `(level / 255 - mean[c]) / std[c]` for every 8-bit level, as ToTensor and
    Normalize compute it on the CPU."""
    import torch

    levels = torch.arange(UINT8_LEVELS, dtype=torch.float32).div(255).expand(len(mean), UINT8_LEVELS)
    return _normalise(levels[:, :, None].clone(), mean, std)[:, :, 0]


def _normalise(tensor: torch.Tensor, mean: Mean, std: Mean) -> torch.Tensor:
    import torch

    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)
