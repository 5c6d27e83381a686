"""One image's overlay as a PNG a person can open: the photo as the model saw it, the anomaly map
translucent on top (the gallery's style and colour map: `gallery.compose_tile`), a caption with the
score and the category's threshold, and a colour bar of the category's scale.

`scan` writes one per flagged image (`maps/category=C/<name>.png`), `predict` one per image (on the
run's scale, `run_map_limits`). The picture is square at the
model's input size (the preprocessing preset's view: the whole image, or its centre crop for `resad`),
scaled up to at least `MIN_SIDE_PX` so small model inputs stay readable. The colour scale is one per
category (`overlay_limits`), so overlays of a category compare; map values at or under its low end
are not drawn.
"""

from __future__ import annotations

import io

import numpy as np

from workflows.reports.gallery import CMAP, GalleryTile, compose_tile, map_range

MIN_SIDE_PX = 256  # overlays of 64-px model inputs are scaled up to this (bilinear)
LINE_PX = 14  # one caption line
FONT_PX = 11
BAR_PX = 10  # the colour bar strip under the image
BAR_LABEL_PX = 14
MARGIN_PX = 4
# without normal scores, the scale spans the threshold +- this fraction of it (scores are >= 0)
FALLBACK_SPREAD = 0.5


def overlay_limits(threshold: float | None, normal_median: float | None) -> tuple[float, float] | None:
    """A category's colour scale (low, high) in anomaly-map units, centred on its threshold: from the
    median score of its calibration normals (low) to as far above the threshold (high); without normal
    scores, threshold * (1 -+ FALLBACK_SPREAD). For methods whose image score is the map's peak
    (baseline, PatchCore `max`) the colours above mid-scale are exactly the pixels over the threshold.
    None without a threshold."""
    if threshold is None:
        return None
    threshold = float(threshold)
    if normal_median is not None and float(normal_median) < threshold:
        spread = threshold - float(normal_median)
    else:
        spread = abs(threshold) * FALLBACK_SPREAD or 1.0
    return threshold - spread, threshold + spread


FLOOR_PERCENTILE = 50.0  # predict: the map shows above the run's median map value (background stays clear)
HIGH_PERCENTILE = 99.5  # predict: the top of the scale (one hot pixel does not wash the rest out)


def run_map_limits(maps: list[np.ndarray]) -> tuple[float, float]:
    """(low, high) of one colour scale over every map of a run (`predict`): low = the median value (the
    floor below which the map is not drawn), high = the 99.5th percentile; (0, 1) without a value."""
    return map_range(list(maps), FLOOR_PERCENTILE, HIGH_PERCENTILE) or (0.0, 1.0)


def display_image(prepared: np.ndarray, mean, std) -> np.ndarray:
    """[3, S, S] model input as it crosses Ray (uint8 pixels, or normalised float32) -> [S, S, 3] uint8:
    the picture the model saw."""
    if prepared.dtype == np.uint8:  # the 8-bit pixels themselves
        return np.ascontiguousarray(prepared.transpose(1, 2, 0))
    pixels = prepared.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return (np.clip(pixels, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def overlay_size(image_side: int, lines: int) -> tuple[int, int]:
    """(width, height) of the PNG `overlay_png` renders: `image_side` model input, `lines` of caption."""
    side = max(int(image_side), MIN_SIDE_PX)
    return side, lines * LINE_PX + MARGIN_PX + side + BAR_PX + BAR_LABEL_PX


def _text_width(draw, text: str, font) -> int:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0]


def _fit(draw, text: str, font, width: int) -> str:
    """`text` shortened from the left ('...tail') to fit `width` pixels: the end of a path says most."""
    if _text_width(draw, text, font) <= width:
        return text
    while text and _text_width(draw, "..." + text, font) > width:
        text = text[1:]
    return "..." + text


def overlay_png(image: np.ndarray, anomaly_map: np.ndarray, limits: tuple[float, float],
                caption: list[str], *, marker: float | None = None) -> bytes:
    """The overlay of one image ([S, S, 3] uint8, map [S, S]) on `limits` as PNG bytes; `caption` lines
    above it, a colour bar under it with the scale's ends and `marker` (the threshold) labelled."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    width, height = overlay_size(image.shape[0], len(caption))
    side = width
    tile = compose_tile(GalleryTile(image, anomaly_map, None, ""), limits, size=side, floor=limits[0])
    canvas = Image.new("RGB", (width, height), "white")
    top = len(caption) * LINE_PX + MARGIN_PX
    canvas.paste(Image.fromarray((np.clip(tile, 0.0, 1.0) * 255).round().astype(np.uint8)), (0, top))
    bar = colormaps[CMAP](np.linspace(0.0, 1.0, side))[None, :, :3].repeat(BAR_PX, axis=0)
    canvas.paste(Image.fromarray((bar * 255).round().astype(np.uint8)), (0, top + side))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=FONT_PX)
    for i, line in enumerate(caption):
        draw.text((MARGIN_PX, i * LINE_PX + 1), _fit(draw, line, font, width - 2 * MARGIN_PX), fill="black",
                  font=font)
    low, high = limits
    label_y = top + side + BAR_PX + 1
    draw.text((1, label_y), f"{low:.3g}", fill="black", font=font)
    high_text = f"{high:.3g}"
    draw.text((width - 1 - _text_width(draw, high_text, font), label_y), high_text, fill="black", font=font)
    if marker is not None and low < marker < high:
        x = int(round((marker - low) / (high - low) * (side - 1)))
        draw.line([(x, top + side), (x, top + side + BAR_PX - 1)], fill="black", width=2)
        text = f"threshold {marker:.3g}"
        draw.text((min(max(0, x - _text_width(draw, text, font) // 2), width - _text_width(draw, text, font)),
                   label_y), text, fill="black", font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()
