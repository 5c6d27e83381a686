"""Synthetic defects painted onto a clean crop: an opacity map plus the colour it blends toward.

Every kind returns a `DefectLayer`; `composite` blends it into the crop. The ground-truth mask is
where the opacity, resampled exactly like the image, is at least 0.5 (done by the caller).
All kinds are vectorised over the pixel grid (no per-pixel Python loops).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

DEFECT_KINDS: tuple[str, ...] = ("scratch", "stain", "cut_paste", "spot", "smudge")
POLARITIES: tuple[str, ...] = ("dark", "bright")


@dataclass
class DefectLayer:
    alpha: np.ndarray  # [h, w] float32 opacity in [0, 1]
    paint: np.ndarray  # [h, w, C] float32 colour the pixels blend toward
    params: dict[str, Any] = field(default_factory=dict)


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _blob_shape(h: int, w: int, area: float, softness: float, rng: np.random.Generator) -> np.ndarray:
    """Irregular ellipse covering about ``area`` of the canvas; 0.5 on its outline, soft edge."""
    aspect = float(np.exp(rng.uniform(-0.6, 0.6)))
    radius = np.sqrt(area * h * w / np.pi)
    rx, ry = radius * np.sqrt(aspect), radius / np.sqrt(aspect)
    margin = max(rx, ry) * 0.6
    cy = rng.uniform(min(margin, h / 2), max(h - margin, h / 2))
    cx = rng.uniform(min(margin, w / 2), max(w - margin, w / 2))
    theta = rng.uniform(0, np.pi)
    yy, xx = _grid(h, w)
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    phi = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0, 0.12) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5))
    dist = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) / wobble
    return np.clip(0.5 + (1.0 - dist) / softness, 0.0, 1.0).astype(np.float32)


def _local_colour(canvas: np.ndarray, weight: np.ndarray) -> np.ndarray:
    total = float(weight.sum()) or 1.0
    return (canvas * weight[:, :, None]).sum(axis=(0, 1)) / total  # [C]


def _shade(local: np.ndarray, polarity: str, dark: tuple[float, float], bright: tuple[float, float],
           rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A colour darker (a fraction of ``local``) or brighter (towards white) than ``local``, and the
    polarity used: a bright defect on a near-white region turns dark, and vice versa."""
    level = float(local.mean())
    if polarity == "bright" and level > 200:
        polarity = "dark"
    elif polarity == "dark" and level < 50:
        polarity = "bright"
    if polarity == "dark":
        return local * rng.uniform(*dark), polarity
    return local + (255.0 - local) * rng.uniform(*bright), polarity


def scratch(canvas: np.ndarray, area: float, polarity: str, px_scale: float,
            rng: np.random.Generator) -> DefectLayer:
    """A thin curved line (quadratic Bezier), 1.5-3.5 output pixels wide."""
    h, w = canvas.shape[:2]
    width = rng.uniform(1.5, 3.5) * px_scale
    length = float(np.clip(area * h * w / width, 0.25 * min(h, w), 0.95 * min(h, w)))
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.cos(angle), np.sin(angle)])
    half = direction * length / 2
    centre = np.array([rng.uniform(np.abs(half[0]), w - np.abs(half[0])),
                       rng.uniform(np.abs(half[1]), h - np.abs(half[1]))])
    bend = np.array([-direction[1], direction[0]]) * rng.uniform(-0.3, 0.3) * length
    t = np.linspace(0.0, 1.0, 96, dtype=np.float32)[:, None]
    p0, p1, p2 = centre - half, centre + bend, centre + half
    curve = ((1 - t) ** 2) * p0 + 2 * (1 - t) * t * p1 + (t**2) * p2  # [T, 2] as (x, y)
    yy, xx = _grid(h, w)
    dist = np.sqrt((xx[None] - curve[:, 0, None, None]) ** 2 + (yy[None] - curve[:, 1, None, None]) ** 2)
    dist = dist.min(axis=0)
    shape = np.clip(width / 2 + 0.5 - dist, 0.0, 1.0)
    opacity = rng.uniform(0.75, 1.0)
    local = _local_colour(canvas, shape)
    colour, used = _shade(local, polarity, (0.2, 0.5), (0.55, 0.9), rng)
    alpha = (shape * opacity).astype(np.float32)
    paint = np.broadcast_to(colour.astype(np.float32), canvas.shape).copy()
    return DefectLayer(alpha, paint, {"width_px": round(width / px_scale, 2), "length_px": round(length, 1),
                                      "opacity": round(opacity, 3), "polarity": used})


def stain(canvas: np.ndarray, area: float, polarity: str, px_scale: float,
          rng: np.random.Generator) -> DefectLayer:
    """A soft-edged, semi-transparent blotch (brownish when the image has colour)."""
    h, w = canvas.shape[:2]
    shape = _blob_shape(h, w, area, softness=rng.uniform(0.5, 0.9), rng=rng)
    opacity = rng.uniform(0.7, 0.95)
    local = _local_colour(canvas, shape)
    colour, used = _shade(local, polarity, (0.45, 0.7), (0.4, 0.65), rng)
    if canvas.shape[2] == 3 and used == "dark":
        colour = colour * np.array([1.0, 0.88, 0.72])
    alpha = (shape * opacity).astype(np.float32)
    paint = np.broadcast_to(colour.astype(np.float32), canvas.shape).copy()
    return DefectLayer(alpha, paint, {"opacity": round(opacity, 3), "polarity": used})


def spot(canvas: np.ndarray, area: float, polarity: str, px_scale: float,
         rng: np.random.Generator) -> DefectLayer:
    """One to three small, nearly opaque dark or bright spots."""
    h, w = canvas.shape[:2]
    count = int(rng.integers(1, 4))
    shape = np.zeros((h, w), np.float32)
    for _ in range(count):  # a handful of blobs, each vectorised over the grid
        shape = np.maximum(shape, _blob_shape(h, w, area / count, softness=rng.uniform(0.1, 0.3), rng=rng))
    opacity = rng.uniform(0.9, 1.0)
    local = _local_colour(canvas, shape)
    colour, used = _shade(local, polarity, (0.15, 0.4), (0.6, 0.9), rng)
    alpha = (shape * opacity).astype(np.float32)
    paint = np.broadcast_to(colour.astype(np.float32), canvas.shape).copy()
    return DefectLayer(alpha, paint, {"spots": count, "opacity": round(opacity, 3), "polarity": used})


def cut_paste(canvas: np.ndarray, donor: np.ndarray, area: float, px_scale: float,
              rng: np.random.Generator) -> DefectLayer:
    """A patch of the same photo taken from another place (``donor``) pasted in with a thin seam."""
    h, w = canvas.shape[:2]
    if donor.shape != canvas.shape:
        raise ValueError(f"cut_paste: donor shape {donor.shape} differs from the crop's {canvas.shape}")
    aspect = float(np.exp(rng.uniform(-0.7, 0.7)))
    side = np.sqrt(area * h * w)
    bw, bh = min(side * np.sqrt(aspect), 0.9 * w), min(side / np.sqrt(aspect), 0.9 * h)
    x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
    yy, xx = _grid(h, w)
    feather = 0.75 * px_scale
    inside_x = np.minimum(xx + 0.5 - x0, x0 + bw - (xx + 0.5))
    inside_y = np.minimum(yy + 0.5 - y0, y0 + bh - (yy + 0.5))
    alpha = np.clip(0.5 + np.minimum(inside_x, inside_y) / (2 * feather), 0.0, 1.0).astype(np.float32)
    return DefectLayer(alpha, donor.astype(np.float32), {"patch_px": [round(bw, 1), round(bh, 1)]})


def smudge(canvas: np.ndarray, area: float, polarity: str, px_scale: float,
           rng: np.random.Generator) -> DefectLayer:
    """A worn / smeared region: detail blurred away and contrast flattened, slightly shaded."""
    from scipy.ndimage import gaussian_filter

    h, w = canvas.shape[:2]
    shape = _blob_shape(h, w, area, softness=rng.uniform(0.3, 0.6), rng=rng)
    sigma = rng.uniform(2.0, 4.0) * px_scale
    blurred = gaussian_filter(canvas, sigma=(sigma, sigma, 0), mode="reflect")
    local = _local_colour(canvas, shape)
    keep = rng.uniform(0.2, 0.5)  # how much of the blurred detail survives
    shaded, used = _shade(local, polarity, (0.8, 0.92), (0.1, 0.2), rng)
    paint = (shaded + (blurred - local) * keep).astype(np.float32)
    return DefectLayer(shape, np.clip(paint, 0, 255), {"sigma_px": round(sigma / px_scale, 2),
                                                       "detail_kept": round(keep, 3), "polarity": used})


def render_defect(kind: str, canvas: np.ndarray, *, area: float, polarity: str, px_scale: float,
                  rng: np.random.Generator, donor: np.ndarray | None = None) -> DefectLayer:
    """Dispatch to one defect kind. ``canvas`` is uint8 [h, w, C]; ``px_scale`` = crop px per output px."""
    source = canvas.astype(np.float32)
    if kind == "scratch":
        return scratch(source, area, polarity, px_scale, rng)
    if kind == "stain":
        return stain(source, area, polarity, px_scale, rng)
    if kind == "spot":
        return spot(source, area, polarity, px_scale, rng)
    if kind == "smudge":
        return smudge(source, area, polarity, px_scale, rng)
    if kind == "cut_paste":
        if donor is None:
            raise ValueError("cut_paste needs a donor crop from another place of the photo")
        return cut_paste(source, donor, area, px_scale, rng)
    raise ValueError(f"unknown defect kind {kind!r}: expected one of {', '.join(DEFECT_KINDS)}")


def composite(canvas: np.ndarray, layer: DefectLayer) -> np.ndarray:
    """Blend the layer into the uint8 crop: ``out = canvas * (1 - alpha) + paint * alpha``."""
    alpha = layer.alpha[:, :, None]
    out = canvas.astype(np.float32) * (1.0 - alpha) + layer.paint * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
