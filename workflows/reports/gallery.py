"""Gallery figure: one row per group of images, each tile the image with its anomaly map overlaid on
one shared colour scale (so tiles compare) and the ground-truth defect outlined in white.

Tiles are composed in numpy into one mosaic drawn on a single axes: a figure of 16 tiles renders in a
fraction of the time 16 matplotlib axes take, which matters when every run of a lodo logs galleries.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np

from workflows.reports.figures import new_figure, save_png

MAP_ALPHA = (0.08, 0.6)  # overlay opacity at the low / high end of the scale: low scores let the image show
CMAP = "jet"
TILE_PX = 160
GAP_PX = 8
CAPTION_PX = 30
LABEL_PX = 120
DPI = 110


@dataclass
class GalleryTile:
    """What one tile shows; ``anomaly_map`` [H, W] at the image's size, ``mask`` [H, W] bool."""

    image: np.ndarray | None  # [H, W, 3] uint8; None when the original could not be read
    anomaly_map: np.ndarray | None
    mask: np.ndarray | None
    caption: str


def map_range(maps: list[np.ndarray | None], low_percentile: float,
              high_percentile: float) -> tuple[float, float] | None:
    """(low, high) colour limits at two percentiles of every finite value of `maps` (one hot pixel does
    not wash out the rest); the min/max when those coincide; None when there is no value."""
    values = [m[np.isfinite(m)].ravel() for m in (np.asarray(m, np.float64) for m in maps if m is not None)]
    values = [v for v in values if v.size]
    if not values:
        return None
    merged = np.concatenate(values)
    low, high = np.percentile(merged, [low_percentile, high_percentile])
    if high <= low:
        low, high = float(merged.min()), float(merged.max())
        high = high if high > low else low + 1.0
    return float(low), float(high)


def shared_map_range(tiles: list[GalleryTile]) -> tuple[float, float] | None:
    """(low, high) colour limits over every shown map (1st-99th percentile); None when no tile has a map."""
    return map_range([t.anomaly_map for t in tiles], 1.0, 99.0)


def overlay_rgba(anomaly_map: np.ndarray, limits: tuple[float, float], opaque: bool = False,
                 floor: float | None = None) -> np.ndarray:
    """The map coloured on the shared scale, more opaque where the score is higher ([H, W, 4] floats);
    with a `floor`, fully transparent where the map is below it (only the suspicious part shows)."""
    from matplotlib import colormaps

    low, high = limits
    values = np.nan_to_num(anomaly_map, nan=low)
    level = np.clip((values - low) / (high - low), 0.0, 1.0)
    rgba = colormaps[CMAP](level)
    rgba[..., 3] = 1.0 if opaque else MAP_ALPHA[0] + (MAP_ALPHA[1] - MAP_ALPHA[0]) * level
    if floor is not None and not opaque:
        rgba[..., 3] = np.where(values < floor, 0.0, rgba[..., 3])
    return rgba


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels of ``mask`` on its border (4-neighbourhood), thickened ``width`` times."""
    padded = np.pad(mask, 1)
    inner = (padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1]
             & padded[1:-1, :-2] & padded[1:-1, 2:])
    edge = mask & ~inner
    for _ in range(width - 1):
        padded = np.pad(edge, 1)
        edge = (padded[1:-1, 1:-1] | padded[:-2, 1:-1] | padded[2:, 1:-1]
                | padded[1:-1, :-2] | padded[1:-1, 2:])
    return edge


def _resize(array: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    from PIL import Image

    if array.shape[:2] == (size, size):
        return array
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    if array.dtype == bool:
        return np.asarray(Image.fromarray(array.astype(np.uint8) * 255).resize((size, size), mode)) > 127
    if array.ndim == 2:
        return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((size, size), mode))
    return np.asarray(Image.fromarray(array).resize((size, size), mode))


def compose_tile(tile: GalleryTile, limits: tuple[float, float] | None, size: int = TILE_PX,
                 floor: float | None = None) -> np.ndarray:
    """One tile as RGB floats [size, size, 3]: image, map blended on top (only above `floor` when one is
    given), defect outline in white."""
    rgb = np.full((size, size, 3), 0.85)
    if tile.image is not None:
        rgb = _resize(tile.image, size).astype(np.float64) / 255.0
    if tile.anomaly_map is not None and limits is not None:
        rgba = overlay_rgba(_resize(tile.anomaly_map, size), limits, opaque=tile.image is None, floor=floor)
        alpha = rgba[..., 3:]
        rgb = rgb * (1.0 - alpha) + rgba[..., :3] * alpha
    if tile.mask is not None and tile.mask.any():
        rgb[outline(_resize(tile.mask, size, nearest=True), width=2)] = 1.0
    return rgb


def plot_gallery(rows: list[tuple[str, list[GalleryTile]]], title: str, path: str,
                 notes: list[str] | None = None) -> str:
    """Rows of tiles (label, tiles); empty rows are listed in the notes. Writes a PNG, returns its path."""
    shown = [(label, tiles) for label, tiles in rows if tiles]
    notes = list(notes or []) + [f"{label}: no image to show (none in this class, or all already shown above)"
                                 for label, tiles in rows if not tiles]
    columns = max([len(tiles) for _, tiles in shown] or [1])
    limits = shared_map_range([t for _, tiles in shown for t in tiles])
    cell_w, cell_h = TILE_PX + GAP_PX, TILE_PX + CAPTION_PX
    width, height = LABEL_PX + columns * cell_w, max(1, len(shown)) * cell_h
    mosaic = np.ones((height, width, 3))
    for row, (_, tiles) in enumerate(shown):
        for col, tile in enumerate(tiles):
            top, left = row * cell_h + CAPTION_PX, LABEL_PX + col * cell_w
            mosaic[top:top + TILE_PX, left:left + TILE_PX] = compose_tile(tile, limits)
    note_px = 14 * sum(len(textwrap.wrap(n, 120)) for n in notes) + 40
    bar_px = 90 if limits else 10
    fig, ax = new_figure((width + bar_px) / DPI, (height + note_px) / DPI)
    fig.subplots_adjust(left=0, right=width / (width + bar_px), top=1 - 34 / (height + note_px),
                        bottom=(note_px - 34) / (height + note_px))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for row, (label, tiles) in enumerate(shown):
        ax.text(LABEL_PX - 10, row * cell_h + CAPTION_PX + TILE_PX / 2, textwrap.fill(label, 14),
                ha="right", va="center", fontsize=8, fontweight="bold")
        for col, tile in enumerate(tiles):
            ax.text(LABEL_PX + col * cell_w + TILE_PX / 2, row * cell_h + CAPTION_PX - 3, tile.caption,
                    ha="center", va="bottom", fontsize=6.5)
    if limits:
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        bar_ax = fig.add_axes((width / (width + bar_px) + 0.01, 0.3, 12 / (width + bar_px), 0.4))
        bar = fig.colorbar(ScalarMappable(Normalize(*limits), CMAP), cax=bar_ax)
        bar.set_label("anomaly-map value\n(one scale, all tiles)", fontsize=7)
        bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=9, y=1 - 6 / (height + note_px), va="top")
    if notes:
        fig.text(0.01, 0.01, "\n".join(textwrap.fill(n, 120) for n in notes), fontsize=6.5, va="bottom")
    return save_png(fig, path, tight=False)
