"""Preprocessing presets equal the authors' torchvision/PIL transforms on the same bytes.

The references below are built the way each authors' code builds its transforms (Res2CLIP
`utils/utils.py:get_transform` + `data/dataset.py` + `test.py` mask threshold; ResAD
`datasets/mvtec.py` / `datasets/visa.py`), written here with torchvision, not copied.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

T = pytest.importorskip("torchvision.transforms")

from residual_core.images import decode_image, decode_mask, image_to_tensor, mask_to_tensor  # noqa: E402
from residual_core.methods import MethodError, method_preprocess  # noqa: E402
from residual_core.preprocess import (  # noqa: E402
    HALF_LEVEL,
    PREPROCESS_NAMES,
    PreprocessError,
    View,
    get_preprocess,
    normalise_uint8,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
S = 32
TOL = 1e-6
# (height, width): square, wide, tall, odd ratios, smaller than S (upsampling), exact multiple
SHAPES = [(64, 64), (45, 77), (77, 45), (33, 50), (20, 27), (96, 64)]


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _photo(shape: tuple[int, int], mode: str, seed: int = 0) -> bytes:
    """Smooth structure plus noise (so resampling differences would show), encoded as PNG."""
    rng = np.random.default_rng(seed)
    height, width = shape
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 80 * np.sin(x / 5.0) * np.cos(y / 7.0)
    channels = [base + rng.normal(0, 30, shape) + 20 * c for c in range(3)]
    rgb = np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    return _png(image.convert("L") if mode == "L" else image)


def _mask_bytes(shape: tuple[int, int], high: int = 255, seed: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        mask[y:y + rng.integers(2, 12), x:x + rng.integers(2, 12)] = high
    mask[rng.random(shape) < 0.03] = high  # isolated pixels: the threshold / nearest rules matter
    return _png(Image.fromarray(mask))


# --------------------------------------------------------------------- the authors' transforms
def res2clip_image_transform(mean=CLIP_MEAN, std=CLIP_STD):
    """open_clip's eval transform with Res2CLIP's replacements: Resize((S, S), BICUBIC, antialias=None),
    CenterCrop((S, S)), then RGB conversion, ToTensor, Normalize (applied to the file as opened)."""
    return T.Compose([
        T.Resize(size=(S, S), interpolation=T.InterpolationMode.BICUBIC, max_size=None, antialias=None),
        T.CenterCrop(size=(S, S)),
        lambda image: image.convert("RGB"),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
    ])


def res2clip_mask(data: bytes) -> torch.Tensor:
    """dataset.py: convert('L') > 0 as 0/255 L; get_transform target: Resize((S, S)) (default bilinear),
    CenterCrop, ToTensor; test.py: > 0.5 -> 1, else 0."""
    binary = np.array(Image.open(io.BytesIO(data)).convert("L")) > 0
    image = Image.fromarray(binary.astype(np.uint8) * 255, mode="L")
    mask = T.Compose([T.Resize((S, S)), T.CenterCrop(S), T.ToTensor()])(image)
    mask[mask > 0.5], mask[mask <= 0.5] = 1, 0
    return mask


def resad_image_transform(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """mvtec.py / visa.py (normalize='w50'; 'imagebind' differs only in mean/std): on .convert('RGB')."""
    return T.Compose([T.Resize(S, T.InterpolationMode.BICUBIC), T.CenterCrop(S), T.ToTensor(),
                      T.Normalize(mean, std)])


def resad_mask(data: bytes, visa: bool) -> torch.Tensor:
    """mvtec.py: Image.open(mask) straight into Resize(S, NEAREST), CenterCrop(S), ToTensor; visa.py sets
    nonzero pixels to 255 first."""
    image = Image.open(io.BytesIO(data))
    if visa:
        array = np.array(image)
        array[array != 0] = 255
        image = Image.fromarray(array)
    return T.Compose([T.Resize(S, Image.NEAREST), T.CenterCrop(S), T.ToTensor()])(image)


# --------------------------------------------------------------------- images
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_res2clip_preset_equals_the_authors_transform(shape, mode):
    data = _photo(shape, mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # antialias=None is deprecated in newer torchvision
        expected = res2clip_image_transform()(Image.open(io.BytesIO(data)))
    got = get_preprocess("res2clip").image(decode_image(data), S, CLIP_MEAN, CLIP_STD)
    assert got.dtype == torch.float32 and got.shape == (3, S, S)
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize("constants", [(IMAGENET_MEAN, IMAGENET_STD), (CLIP_MEAN, CLIP_STD)])
def test_resad_preset_equals_the_authors_transform(shape, mode, constants):
    data = _photo(shape, mode)
    expected = resad_image_transform(*constants)(Image.open(io.BytesIO(data)).convert("RGB"))
    got = get_preprocess("resad").image(decode_image(data), S, *constants)
    assert got.dtype == torch.float32 and got.shape == (3, S, S)
    assert (got - expected).abs().max().item() <= TOL


def test_jpeg_input_matches_too():
    data = _png(Image.open(io.BytesIO(_photo((45, 77), "RGB"))), "JPEG")
    expected = resad_image_transform()(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (get_preprocess("resad").image(decode_image(data), S) - expected).abs().max() <= TOL


def test_presets_differ_where_the_authors_differ():
    image = decode_image(_photo((45, 77), "RGB"))
    square = get_preprocess("res2clip").image(image, S)
    crop = get_preprocess("resad").image(image, S)
    fast = get_preprocess("torch-bicubic").image(image, S)
    assert (square - crop).abs().max() > 0.1  # centre crop vs whole image on a non-square image
    assert 1e-4 < (square - fast).abs().max()  # PIL 8-bit vs torch float resampling
    square_image = decode_image(_photo((64, 64), "RGB"))
    assert torch.equal(get_preprocess("res2clip").image(square_image, S),
                       get_preprocess("resad").image(square_image, S))  # square: same geometry


def test_torch_bicubic_is_the_previous_fast_path():
    image = decode_image(_photo((45, 77), "RGB"))
    assert torch.equal(get_preprocess("torch-bicubic").image(image, S, CLIP_MEAN, CLIP_STD),
                       image_to_tensor(image, S, CLIP_MEAN, CLIP_STD))
    mask = decode_mask(_mask_bytes((45, 77)))
    assert torch.equal(get_preprocess("torch-bicubic").mask(mask, S), mask_to_tensor(mask, S))


# --------------------------------------------------------------------- masks
@pytest.mark.parametrize("shape", SHAPES)
def test_res2clip_mask_equals_bilinear_resize_thresholded_at_half(shape):
    data = _mask_bytes(shape)
    got = get_preprocess("res2clip").mask(decode_mask(data), S)
    expected = res2clip_mask(data)
    assert got.shape == (1, S, S) and set(got.unique().tolist()) <= {0.0, 1.0}
    assert (got - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("high", "visa"), [(255, False), (255, True), (1, True)])  # VisA masks are 0/1
def test_resad_mask_equals_nearest_resize_and_centre_crop(shape, high, visa):
    data = _mask_bytes(shape, high=high)
    got = get_preprocess("resad").mask(decode_mask(data), S)
    expected = resad_mask(data, visa)
    assert got.shape == (1, S, S) and set(got.unique().tolist()) <= {0.0, 1.0}
    assert (got - expected).abs().max().item() <= TOL


def test_res2clip_threshold_on_levels_is_totensor_over_half():
    """Its masks are thresholded on the 8-bit levels: above 127 is exactly ToTensor's level / 255 > 0.5."""
    levels = np.arange(256, dtype=np.uint8)
    unit = torch.from_numpy(levels).to(torch.float32).div(255)
    assert np.array_equal(levels > HALF_LEVEL, (unit > 0.5).numpy())


@pytest.mark.parametrize("name", PREPROCESS_NAMES)
def test_no_mask_is_all_normal(name):
    assert torch.equal(get_preprocess(name).mask(None, S), torch.zeros(1, S, S))
    assert np.array_equal(get_preprocess(name).mask_array(None, S), np.zeros((S, S), bool))


# --------------------------------------------------------------------- geometry, display, registry
def test_view_says_which_part_of_the_original_the_model_sees():
    assert get_preprocess("res2clip").view((77, 45), S) == View(0.0, 0.0, 77.0, 45.0)
    assert get_preprocess("resad").view((64, 64), S) == View(0.0, 0.0, 64.0, 64.0)
    wide = get_preprocess("resad").view((200, 100), 50)  # resized 100 x 50, crop from x = 25
    assert wide == View(50.0, 0.0, 100.0, 100.0)
    tall = get_preprocess("resad").view((100, 300), 50)  # resized 50 x 150, crop from y = 50
    assert tall == View(0.0, 100.0, 100.0, 100.0)


def test_view_locates_a_marker_seen_by_the_model():
    """A white square in the original lands where View says in the model's S x S input."""
    original = np.zeros((100, 200, 3), np.uint8)
    original[40:60, 110:130] = 255  # x 110..130, y 40..60 in the original
    image = Image.fromarray(original)
    preset, size = get_preprocess("resad"), 50
    seen = preset.display(image, size)[..., 0] > 127
    rows, cols = np.nonzero(seen)
    view = preset.view(image.size, size)
    x0 = view.left + cols.min() * view.width / size
    x1 = view.left + (cols.max() + 1) * view.width / size
    y0 = view.top + rows.min() * view.height / size
    y1 = view.top + (rows.max() + 1) * view.height / size
    assert abs(x0 - 110) <= 2 and abs(x1 - 130) <= 2 and abs(y0 - 40) <= 2 and abs(y1 - 60) <= 2


@pytest.mark.parametrize("name", PREPROCESS_NAMES)
def test_display_is_the_unnormalised_model_input(name):
    image = decode_image(_photo((45, 77), "RGB"))
    preset = get_preprocess(name)
    pixels = preset.display(image, S)
    assert pixels.shape == (S, S, 3) and pixels.dtype == np.uint8
    unit = preset.image(image, S, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)).permute(1, 2, 0).numpy()
    assert np.abs(pixels / 255.0 - unit).max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("name", PREPROCESS_NAMES)
def test_eight_bit_presets_normalise_their_uint8_pixels_bit_for_bit(name):
    """What the pipelines rely on to carry uint8 between processes: for a preset that says so, a batch
    of `pixels_chw` normalised by `normalise_uint8` is exactly its `image()`; torch-bicubic says not."""
    images = [decode_image(_photo(shape, "RGB", seed)) for seed, shape in enumerate(SHAPES)]
    preset = get_preprocess(name)
    batch = torch.from_numpy(np.stack([preset.pixels_chw(image, S) for image in images]))
    assert batch.dtype == torch.uint8 and batch.shape == (len(images), 3, S, S)
    expected = torch.stack([preset.image(image, S, CLIP_MEAN, CLIP_STD) for image in images])
    got = normalise_uint8(batch, CLIP_MEAN, CLIP_STD)
    assert got.dtype == torch.float32
    assert preset.EIGHT_BIT_EXACT == (name != "torch-bicubic")
    assert torch.equal(got, expected) == preset.EIGHT_BIT_EXACT


def _every_level(batch: int = 2) -> torch.Tensor:
    """uint8 [batch, 3, 16, 16] holding every 8-bit level in every channel."""
    levels = torch.arange(256, dtype=torch.uint8).view(16, 16)
    return torch.stack([levels, levels.flip(0), levels.t()])[None].repeat(batch, 1, 1, 1)


def test_normalise_uint8_is_to_tensor_then_normalize_at_every_level():
    pixels = _every_level()
    expected = T.Normalize(CLIP_MEAN, CLIP_STD)(pixels.float().div(255))
    got = normalise_uint8(pixels, CLIP_MEAN, CLIP_STD)
    assert got.dtype == torch.float32 and got.shape == pixels.shape and torch.equal(got, expected)
    assert torch.equal(normalise_uint8(pixels[0], CLIP_MEAN, CLIP_STD), expected[0])  # one image


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_normalise_uint8_gives_the_same_bits_on_the_gpu():
    pixels = _every_level()
    got = normalise_uint8(pixels.cuda(), IMAGENET_MEAN, IMAGENET_STD)
    assert got.is_cuda and torch.equal(got.cpu(), normalise_uint8(pixels, IMAGENET_MEAN, IMAGENET_STD))


def test_unknown_names_and_bad_sizes_are_refused():
    with pytest.raises(PreprocessError, match="unknown preprocess preset 'bilinear'"):
        get_preprocess("bilinear")
    with pytest.raises(PreprocessError, match="positive int"):
        get_preprocess("resad").image(decode_image(_photo((20, 20), "RGB")), (16, 16))


# --------------------------------------------------------------------- methods declare their preset
def test_methods_declare_their_authors_preset_by_default():
    assert method_preprocess("res2clip") == "res2clip"
    assert method_preprocess("res2clip", {"mode": "finetune"}) == "res2clip"
    assert method_preprocess("resadpp") == "resad"
    assert method_preprocess("resadpp", {"preset": "vit"}) == "resad"
    assert method_preprocess("baseline") == "res2clip"  # whole image kept (documented choice)
    for name in ("baseline", "res2clip", "resadpp"):
        assert method_preprocess(name, {"preprocess": "torch-bicubic"}) == "torch-bicubic"
        with pytest.raises(MethodError, match="preprocess"):
            method_preprocess(name, {"preprocess": "nearest"})
    with pytest.raises(MethodError, match="unknown method"):
        method_preprocess("nope")


def test_built_methods_carry_the_preset(tmp_path):
    from residual_core.backbones import create_backbone
    from residual_core.methods import create_method
    from residual_core.methods.res2clip import Res2ClipConfig

    backbone = create_backbone("effnet-lite0", image_size=64)
    assert create_method("baseline", backbone).preprocess == "res2clip"
    method = create_method("baseline", backbone, preprocess="resad")
    assert method.preprocess == "resad" and method.config_dict()["preprocess"] == "resad"
    assert create_method("resadpp", backbone).preprocess == "resad"
    assert create_method("res2clip", backbone).preprocess == "res2clip"
    config = Res2ClipConfig(preprocess="resad")
    assert Res2ClipConfig.from_dict(config.to_dict()).preprocess == "resad"
