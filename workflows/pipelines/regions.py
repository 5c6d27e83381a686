"""Where the defect is: the top anomalous region of an anomaly map, and heat-map PNGs for flagged images.

The top region is the connected component (8-connectivity) containing the map's maximum after
thresholding at `median + level * (max - median)` (level 0.5 by default: pixels at least halfway from
the typical value to the peak). Its box is given in the ORIGINAL image's pixel coordinates
(x0, y0, x1, y1; x1/y1 exclusive) and its area as a fraction of the image. The map covers the part of
the original that the preprocessing preset showed the model (`residual_core.preprocess.View`: the whole
image, or a centre crop for `resad`), and the box is mapped back through it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

DEFAULT_REGION_LEVEL = 0.5


@dataclass(frozen=True)
class Region:
    x0: int
    y0: int
    x1: int
    y1: int
    area_fraction: float

    def bbox(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


def top_region(anomaly_map: np.ndarray, original_size: tuple[int, int], *,
               level: float = DEFAULT_REGION_LEVEL,
               view: tuple[float, float, float, float] | None = None) -> Region:
    """Top anomalous region of a [H, W] map in the pixels of the original image, `original_size` =
    (width, height). `view` = (left, top, width, height): the rectangle of the original the map covers
    (`Preprocess.view(...).as_tuple()`); None is the whole image."""
    from scipy import ndimage

    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"anomaly map must be a non-empty 2-D array, got shape {values.shape}")
    if not 0.0 <= level <= 1.0:
        raise ValueError(f"region level must be in [0, 1], got {level}")
    peak, median = float(values.max()), float(np.median(values))
    cut = median + level * (peak - median)
    binary = values >= cut if peak > median else np.ones_like(values, dtype=bool)
    labels, _ = ndimage.label(binary, structure=np.ones((3, 3), dtype=bool))
    row, col = np.unravel_index(int(values.argmax()), values.shape)
    component = labels == labels[row, col]
    rows, cols = np.nonzero(component)
    height, width = values.shape
    out_w, out_h = original_size
    left, top, view_w, view_h = view if view is not None else (0.0, 0.0, float(out_w), float(out_h))
    sx, sy = view_w / width, view_h / height
    return Region(
        x0=int(max(0, np.floor(left + cols.min() * sx))), y0=int(max(0, np.floor(top + rows.min() * sy))),
        x1=int(min(out_w, np.ceil(left + (cols.max() + 1) * sx))),
        y1=int(min(out_h, np.ceil(top + (rows.max() + 1) * sy))),
        area_fraction=float(component.mean() * (view_w * view_h) / (out_w * out_h)),
    )


def _colormap(unit: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-cyan-yellow-red ramp (jet-like, no matplotlib)."""
    stops = np.array([0.0, 0.35, 0.65, 1.0], dtype=np.float32)
    colours = np.array([[0, 0, 160], [0, 200, 255], [255, 230, 0], [220, 0, 0]], dtype=np.float32)
    channels = [np.interp(unit, stops, colours[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def heatmap_png(anomaly_map: np.ndarray, *, low: float | None = None, high: float | None = None) -> bytes:
    """A compressed heat-map PNG of a [H, W] map; colours span [low, high] (default: the map's range)."""
    from PIL import Image

    values = np.asarray(anomaly_map, dtype=np.float32)
    low = float(values.min()) if low is None else float(low)
    high = float(values.max()) if high is None else float(high)
    unit = np.clip((values - low) / max(high - low, 1e-12), 0.0, 1.0)
    buffer = io.BytesIO()
    Image.fromarray(_colormap(unit), mode="RGB").save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
