"""Matplotlib on the non-interactive Agg canvas: figures created and closed without pyplot state."""

from __future__ import annotations

import os

from matplotlib.figure import Figure


def new_figure(width: float, height: float, nrows: int = 1, ncols: int = 1, dpi: int = 110, **subplot_kw):
    """A figure detached from pyplot (nothing global to leak between runs) and its axes."""
    fig = Figure(figsize=(width, height), dpi=dpi)
    axes = fig.subplots(nrows, ncols, squeeze=nrows * ncols == 1, **subplot_kw)
    return fig, axes


def save_png(fig: Figure, path: str, *, tight: bool = True) -> str:
    """Write ``fig`` as PNG (parent directory created) and return the path. ``tight`` trims the margins
    (one extra draw: figures that place everything themselves pass False)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # light zlib compression: PNG encoding dominates the cost otherwise; files stay small (flat colours)
    fig.savefig(path, format="png", bbox_inches="tight" if tight else None, pil_kwargs={"compress_level": 2})
    return path
