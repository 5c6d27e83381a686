"""`elpv`: real solar cells with real defects (image labels only, no masks) from `elpv-dataset`.

Categories ``mono`` and ``poly``. Normal = defect probability 0, anomalous = probability 1; the
1/3 and 2/3 cells join the test split (label 1, defect_type ``uncertain_p33`` / ``uncertain_p67``)
only when asked. Defective cells are darker on average than normal ones (inactive areas are
dark), so the test normals are chosen by nearest-neighbour matching on mean intensity and file
size to the defective cells (optimal assignment); references come only from the normal cells left after that.
At full scale many defective cells are darker (or compress smaller) than nearly all normal cells; keeping them
would let those statistics alone find defects, so the test split keeps the largest set of matched pairs
that leaves both statistics near chance, and the manifest lists the defective cells left out.

The labels file is read directly (same format `elpv_dataset.utils.load_dataset` parses) because
that function decodes all 2,624 cells and returns no file names, which the manifest needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from workflows.bench.balance import ImageStats, stats_of
from workflows.bench.config import BenchScale
from workflows.bench.encoding import derive_seed, finish_image, rng_for
from workflows.bench.manifest import rank_auroc
from workflows.bench.sources import package_file
from workflows.bench.synthetic import Rendered, Sample, make_sample

DATASET = "elpv"
CATEGORIES: tuple[str, ...] = ("mono", "poly")
LICENSE = "CC BY-NC-SA 4.0 (images), Apache-2.0 (code) - elpv-dataset"
UNCERTAIN = {1 / 3: "uncertain_p33", 2 / 3: "uncertain_p67"}
#: at small scale normal cells are matched from a random pool this many times the defect count
#: (and defective cells drawn from a pool a quarter that size)
SMALL_POOL_FACTOR = 12
#: at full scale the test pairs are cut back until the image AUROC of encoded size alone and of mean
#: intensity alone both lie within 0.5 +- this (the leak test allows +-0.15)
BALANCE_TOLERANCE = 0.05


@dataclass(frozen=True)
class Cell:
    relpath: str  # inside the elpv_dataset package, e.g. data/images/cell0001.png
    probability: float
    cell_type: str


def read_labels() -> list[Cell]:
    """All cells listed in the package's labels.csv (path, defect probability, mono/poly)."""
    path = package_file("elpv_dataset", "data/labels.csv")
    cells = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 3:
                raise ValueError(f"{path}:{number}: expected 'path probability type', got {line.strip()!r}")
            cells.append(Cell(f"data/{parts[0]}", float(parts[1]), parts[2]))
    return cells


def _cell_pixels(cell: Cell) -> np.ndarray:
    with Image.open(package_file("elpv_dataset", cell.relpath)) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)[:, :, None]


def render_cell(cell: Cell, output_px: int | None) -> Rendered:
    """Resize + PNG-encode (the shared path); at native size the original bytes are kept as they are."""
    pixels = _cell_pixels(cell)
    if output_px is None:
        with open(package_file("elpv_dataset", cell.relpath), "rb") as handle:
            data = handle.read()
        return Rendered(data, pixels.shape[1], pixels.shape[0], stats_of(data, pixels))
    data, out = finish_image(pixels, output_px)
    return Rendered(data, out.width, out.height, stats_of(data, np.asarray(out)))


def _match_costs(defective: list[ImageStats], normals: list[ImageStats]) -> np.ndarray:
    """L1 distances on (log size, mean intensity), standardised over both groups: [defective, normal]."""
    def raw(items: list[ImageStats]) -> np.ndarray:
        return np.array([[np.log(s.encoded_bytes), s.mean_intensity] for s in items])

    d_raw, n_raw = raw(defective), raw(normals)
    scale = np.concatenate([d_raw, n_raw]).std(axis=0) + 1e-9
    return (np.abs(d_raw[:, None, :] - n_raw[None, :, :]) / scale).sum(axis=2)


def match_normals(defective: list[ImageStats], normals: list[ImageStats]) -> tuple[list[int], np.ndarray]:
    """Optimal one-to-one matching (Hungarian, L1 on standardised log size and mean intensity):
    for each defective cell the index of a distinct normal cell, and the matching costs."""
    from scipy.optimize import linear_sum_assignment

    if len(normals) < len(defective):
        raise ValueError(f"elpv: {len(normals)} normal cells cannot be matched to {len(defective)} defective")
    cost = _match_costs(defective, normals)
    rows, cols = linear_sum_assignment(cost)
    matched = np.empty(len(defective), dtype=np.int64)
    matched[rows] = cols
    return [int(j) for j in matched], cost[np.arange(len(defective)), matched]


def _near_chance(defective: list[ImageStats], normals: list[ImageStats], tolerance: float) -> bool:
    labels = [1] * len(defective) + [0] * len(normals)
    both = defective + normals
    aurocs = (rank_auroc([s.encoded_bytes for s in both], labels),
              rank_auroc([s.mean_intensity for s in both], labels))
    return all(abs(a - 0.5) <= tolerance for a in aurocs)


def balanced_pairs(defective: list[ImageStats], normals: list[ImageStats],
                   tolerance: float = BALANCE_TOLERANCE) -> list[tuple[int, int]]:
    """The largest set of (defective, normal) index pairs, matched one to one, on which neither encoded
    size nor mean intensity alone separates the two groups (both AUROCs within 0.5 +- ``tolerance``).

    Defective cells are dropped worst match first (order of their cost in the optimal matching of all
    of them); after each drop the rest are matched again optimally, so that normals freed by the
    dropped cells can serve the kept ones. Sorted by defective index."""
    from scipy.optimize import linear_sum_assignment

    if len(normals) < len(defective):
        raise ValueError(f"elpv: {len(normals)} normal cells cannot be matched to {len(defective)} defective")
    cost = _match_costs(defective, normals)
    rows, cols = linear_sum_assignment(cost)
    worst_last = rows[np.argsort(cost[rows, cols], kind="stable")]
    for count in range(len(worst_last), 0, -1):
        kept = np.sort(worst_last[:count])
        sub_rows, sub_cols = linear_sum_assignment(cost[kept])
        pairs = sorted((int(kept[r]), int(c)) for r, c in zip(sub_rows, sub_cols, strict=True))
        if _near_chance([defective[d] for d, _ in pairs], [normals[n] for _, n in pairs], tolerance):
            return pairs
    raise ValueError(f"elpv: no set of matched pairs keeps size and mean intensity within 0.5 +- {tolerance}")


def build_elpv_category(category: str, cells: list[Cell], sizes: BenchScale, seed: int,
                        uncertain: bool) -> tuple[list[Sample], dict]:
    """All samples of one elpv category (``mono`` or ``poly``) and its manifest section."""
    if category not in CATEGORIES:
        raise ValueError(f"elpv category {category!r}: expected one of {', '.join(CATEGORIES)}")
    rng = rng_for(seed, DATASET, category, "split")
    px = sizes.elpv_output_px
    of_type = [c for c in cells if c.cell_type == category]
    normal = [c for c in of_type if c.probability == 0.0]
    broken = [c for c in of_type if c.probability == 1.0]
    n_def, n_train = sizes.elpv_test_defective_per_category, sizes.elpv_train_per_category
    if n_def is not None:
        # small scale: the defective cells are drawn from those with a close normal match (common
        # support) among random pools; the cells are compared as rendered (resized + encoded)
        broken = _subset(broken, SMALL_POOL_FACTOR // 4 * n_def, rng)
        normal = _subset(normal, SMALL_POOL_FACTOR * n_def + (n_train or 0), rng)
    broken_r = [render_cell(c, px) for c in broken]
    normal_r = [render_cell(c, px) for c in normal]
    if n_def is None:  # full scale: as many matched pairs as keep trivial statistics blind
        pairs = balanced_pairs([r.stats for r in broken_r], [r.stats for r in normal_r])
        keep, test_idx = [d for d, _ in pairs], sorted(n for _, n in pairs)
    else:
        matched, cost = match_normals([r.stats for r in broken_r], [r.stats for r in normal_r])
        keep = sorted(np.argsort(cost, kind="stable")[:n_def].tolist())
        test_idx = sorted(matched[i] for i in keep)
    kept = set(keep)
    left_out = [f"elpv_dataset/{c.relpath}" for i, c in enumerate(broken) if i not in kept]
    broken, broken_r = [broken[i] for i in keep], [broken_r[i] for i in keep]
    chosen = set(test_idx)
    rest = [i for i in range(len(normal)) if i not in chosen]
    if n_train is not None:
        rest = sorted(int(i) for i in rng.choice(rest, min(n_train, len(rest)), replace=False))

    def meta(cell: Cell, split: str, role: str) -> dict:
        return {"dataset": DATASET, "category": category, "split": split,
                "source": f"elpv_dataset/{cell.relpath}", "crop_box": None, "transform": "none",
                "sample_seed": derive_seed(seed, DATASET, category, cell.relpath),
                "elpv_probability": round(cell.probability, 4), "elpv_role": role}

    samples = [make_sample(meta(normal[i], "train", "normal"), normal_r[i]) for i in rest]
    samples += [make_sample(meta(normal[i], "test", "normal (matched)"), normal_r[i]) for i in test_idx]
    samples += [_labelled(meta(cell, "test", "defective"), cell_r, "defective")
                for cell, cell_r in zip(broken, broken_r, strict=True)]
    extra = []
    if uncertain:  # not matched: these cells are an extra, harder test set behind an option
        for probability, name in UNCERTAIN.items():
            level = [c for c in of_type if abs(c.probability - probability) < 1e-3]
            if n_def is not None:
                level = _subset(level, n_def, rng)
            extra += [_labelled(meta(cell, "test", name), render_cell(cell, px), name) for cell in level]
    samples += extra
    section = {
        "source": "elpv_dataset/data/images (labels.csv)", "license": LICENSE, "output_px": px,
        "split_method": (
            "test: defect probability 1 cells plus as many probability 0 cells matched to them one to one "
            "on mean intensity and encoded size (small scale: defective cells drawn from those with a close "
            "match; full scale: the largest set of matched pairs on which the AUROC of encoded size alone "
            f"and of mean intensity alone both stay within 0.5 +- {BALANCE_TOLERANCE}, dropping the "
            "defective cells with the worst matches first); train: probability 0 cells not in test"
            + ("; probability 1/3 and 2/3 cells added to test as label 1" if uncertain else "")),
        "counts": {"train": len(rest), "test_normal": len(test_idx), "test_defective": len(broken),
                   "test_uncertain": len(extra)},
    }
    if n_def is None:
        section["counts"]["defective_left_out"] = len(left_out)
        section["defective_left_out"] = {
            "reason": ("no close normal match (darker or smaller-compressing than nearly all normal cells): "
                       "keeping them would let mean intensity or file size alone find defects; they are in "
                       "no split (never references)"),
            "sources": left_out}
    return samples, section


def _subset(cells: list[Cell], count: int, rng: np.random.Generator) -> list[Cell]:
    if count >= len(cells):
        return cells
    return [cells[i] for i in sorted(rng.choice(len(cells), count, replace=False))]


def _labelled(meta: dict, rendered: Rendered, defect_type: str) -> Sample:
    """An anomalous cell: label 1, no mask (ELPV has image labels only)."""
    rendered.kind = defect_type
    sample = make_sample(meta, rendered)
    sample.row["label"] = sample.record["label"] = 1
    return sample
