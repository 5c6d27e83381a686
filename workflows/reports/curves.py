"""Per-category ROC (image and pixel) and PRO curve figures as PNG (matplotlib Agg).

Input is a ``MetricAccumulator`` (bounded binned counts), never per-pixel data. The legend carries the
logged metric (AUROC, AUPRO@limit); a curve that is not defined (e.g. no masks) is replaced by a note
saying why, and no PRO figure is written for it.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field

from residual_core.metrics.accumulator import MetricAccumulator
from residual_core.metrics.curve_points import CurvePoints, pro_curve_points, roc_curve_points
from workflows.reports.figures import new_figure, save_png

ROC_STYLE = {"image": ("tab:blue", "image"), "pixel": ("tab:orange", "pixel")}


@dataclass
class CurveFiles:
    """What was written for one category: PNG paths and, for each figure not written, the reason."""

    roc_png: str | None = None
    pro_png: str | None = None
    missing: dict[str, str] = field(default_factory=dict)  # figure -> reason


def _note(ax, lines: list[str]) -> None:
    """Why a curve is missing, in a box at the bottom of the axes."""
    if lines:
        text = "\n".join(textwrap.fill(line, 58) for line in lines)
        ax.text(0.5, 0.03, text, transform=ax.transAxes, ha="center", va="bottom", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "lightyellow", "alpha": 0.95})


def _frame(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Square unit axes with a small margin so curves on the borders (perfect scores) stay visible;
    fixed figure margins (no tight bounding box: one draw per figure instead of two)."""
    ax.figure.subplots_adjust(left=0.13, right=0.97, bottom=0.1, top=0.88)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel=xlabel, ylabel=ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def describe_counts(counts: dict) -> str:
    """One line: how many images, of which class, and the ground-truth regions behind the curves."""
    text = (f"{counts.get('images', 0)} images: {counts.get('normal_images', 0)} normal, "
            f"{counts.get('anomalous_images', 0)} anomalous")
    if counts.get("regions"):
        text += f"; {counts['regions']} defect regions"
    return text


def plot_roc(curves: dict[str, CurvePoints], title: str, path: str) -> str:
    """One axes, one line per defined level ("image", "pixel"); undefined levels noted in the corner."""
    fig, ax = new_figure(5.2, 5.0)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="chance")
    notes = []
    for level, curve in curves.items():
        color, name = ROC_STYLE.get(level, ("black", level))
        if curve.defined:
            ax.plot(curve.x, curve.y, color=color, lw=2, clip_on=False,
                    label=f"{name} ({curve.metric} = {100 * curve.area:.1f}%)")
        else:
            extra = " or PRO curve" if level == "pixel" else ""
            notes.append(f"no {name} ROC{extra}: {curve.undefined_reason}")
    _frame(ax, "false-positive rate", "true-positive rate", title)
    ax.legend(loc="lower right" if not notes else "center right", fontsize=9)
    _note(ax, notes)
    return save_png(fig, path, tight=False)


def plot_pro(curve: CurvePoints, title: str, path: str) -> str:
    """PRO vs FPR; the area AUPRO integrates ([0, limit]) is shaded."""
    if not curve.defined:
        raise ValueError(f"{title}: PRO curve is not defined ({curve.undefined_reason})")
    fig, ax = new_figure(5.2, 5.0)
    ax.axvspan(0, curve.limit, color="tab:green", alpha=0.08, label=f"AUPRO range (FPR ≤ {curve.limit:g})")
    ax.plot(curve.x, curve.y, color="tab:green", lw=2, clip_on=False,
            label=f"PRO ({curve.metric} = {100 * curve.area:.1f}%)")
    ax.axvline(curve.limit, color="tab:green", ls="--", lw=1)
    _frame(ax, "pixel false-positive rate", "per-region overlap", title)
    ax.legend(loc="lower right", fontsize=9)
    return save_png(fig, path, tight=False)


def write_category_curves(acc: MetricAccumulator, title: str, out_dir: str, stem: str) -> CurveFiles:
    """``<stem>_roc.png`` always (image ROC, plus pixel ROC when defined) and ``<stem>_pro.png`` when
    the PRO curve is defined; ``missing`` holds the reason for each curve left out."""
    computed = acc.compute()
    roc = {"image": roc_curve_points(acc, "image", computed=computed),
           "pixel": roc_curve_points(acc, "pixel", computed=computed)}
    pro = pro_curve_points(acc, computed=computed)
    title = f"{title}\n{describe_counts(computed['counts'])}"
    files = CurveFiles()
    files.roc_png = plot_roc(roc, f"ROC — {title}", os.path.join(out_dir, f"{stem}_roc.png"))
    for level, curve in roc.items():
        if not curve.defined:
            files.missing[f"{level} ROC"] = curve.undefined_reason
    if pro.defined:
        files.pro_png = plot_pro(pro, f"PRO — {title}", os.path.join(out_dir, f"{stem}_pro.png"))
    else:
        files.missing["PRO"] = pro.undefined_reason
    return files
