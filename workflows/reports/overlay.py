"""One image's anomaly map over the photo, in the gallery's style (`gallery.compose_tile`): the map on a
colour scale shared by every image of a run, translucent, shown only above the scale's lower end, with
the image score (and verdict) in the title. `predict` writes one per image.
"""

from __future__ import annotations

import numpy as np

from workflows.reports.figures import new_figure, save_png
from workflows.reports.gallery import CMAP, GalleryTile, compose_tile

OVERLAY_PX = 320
DPI = 110
FLOOR_PERCENTILE = 50.0  # the map shows above the run's median map value: background stays clear
HIGH_PERCENTILE = 99.5


def run_map_limits(maps: list[np.ndarray]) -> tuple[float, float]:
    """(low, high) of the run's colour scale over every map: low = median value (the floor below which
    the map is not drawn), high = 99.5th percentile (one hot pixel does not wash the rest out)."""
    finite = [np.asarray(m, np.float64)[np.isfinite(m)].ravel() for m in maps]
    values = np.concatenate(finite) if finite else np.zeros(0)
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [FLOOR_PERCENTILE, HIGH_PERCENTILE])
    if high <= low:
        low, high = float(values.min()), float(values.max())
        high = high if high > low else low + 1.0
    return float(low), float(high)


def write_overlay(image: np.ndarray, anomaly_map: np.ndarray, limits: tuple[float, float], title: str,
                  path: str) -> str:
    """PNG of `image` (uint8 [S, S, 3], as the model saw it) with `anomaly_map` [S, S] above the scale's
    lower end, a colour bar of the shared scale and `title`; returns `path`."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rgb = compose_tile(GalleryTile(image, anomaly_map, None, ""), limits, size=OVERLAY_PX, floor=limits[0])
    bar_px, title_px = 90, 40
    width, height = OVERLAY_PX + bar_px, OVERLAY_PX + title_px
    fig, ax = new_figure(width / DPI, height / DPI, dpi=DPI)
    fig.subplots_adjust(left=0, right=OVERLAY_PX / width, top=OVERLAY_PX / height, bottom=0)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    bar_ax = fig.add_axes((OVERLAY_PX / width + 0.03, 0.1, 12 / width, 0.7))
    bar = fig.colorbar(ScalarMappable(Normalize(*limits), CMAP), cax=bar_ax)
    bar.set_label("anomaly-map value\n(one scale, this run)", fontsize=7)
    bar.ax.tick_params(labelsize=7)
    fig.suptitle(title, fontsize=8, y=1 - 4 / height, va="top")
    return save_png(fig, path, tight=False)
