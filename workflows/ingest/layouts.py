"""Source layouts -> items (image path, labels, matching mask path) plus layout-level problems.

Layouts only walk the tree and pair images with masks; reading and validating happens in
``workflows.ingest.run``. Every regular file inside an image folder becomes an item, so a stray
non-image file is quarantined (by path and reason) instead of silently skipped.
"""

from __future__ import annotations

import csv
import io
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from workflows.datasets.schema import SchemaError, check_partition_value
from workflows.ingest.quarantine import Problem
from workflows.ingest.source import SourceEscapeError, SourceTree

LAYOUTS = ("mvtec", "mpdd", "btad", "visa", "folder")
# layouts whose datasets come with pixel ground truth for every anomaly; `folder` has it where masks exist
PIXEL_MASK_LAYOUTS = ("mvtec", "mpdd", "btad", "visa")


def pixel_ground_truth_of(layout: str) -> bool | None:
    """Whether a layout's test images have pixel ground truth (None: infer from the masks found)."""
    return True if layout in PIXEL_MASK_LAYOUTS else None
ESCAPES = "symlink escapes the source tree"


@dataclass(frozen=True)
class SourceItem:
    category: str
    split: str
    label: int | None
    defect_type: str | None
    image: str             # relative path of the image
    mask: str | None       # relative path of its mask, when one was found


@dataclass
class LayoutScan:
    items: list[SourceItem] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)


def _mask_key(name: str) -> str:
    stem = posixpath.splitext(name)[0]
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


class _MaskIndex:
    """Masks of one folder by image stem (``<stem>_mask.png`` or ``<stem>.<ext>``); tracks unused ones.
    Its sub-folders (not followed when a symlink leaves the tree) are kept in ``folders``; an image
    without a mask here takes one from ``fallback``."""

    def __init__(self, tree: SourceTree, rel_dir: str, scan: LayoutScan, category: str,
                 fallback: _MaskIndex | None = None) -> None:
        self.by_key: dict[str, str] = {}
        self.used: set[str] = set()
        self.folders: dict[str, str] = {}  # name -> relative path
        self.fallback = fallback
        for entry in tree.list_dir(rel_dir):
            if entry.escapes:
                scan.problems.append(Problem("mask", entry.rel, ESCAPES, category))
            elif entry.is_dir:
                self.folders[entry.name] = entry.rel
            else:
                self.by_key[_mask_key(entry.name)] = entry.rel

    def take(self, image_name: str) -> str | None:
        key = posixpath.splitext(image_name)[0]
        found = None if key in self.used else self.by_key.get(key)  # each mask pairs with one image
        if found:
            self.used.add(key)
            return found
        return self.fallback.take(image_name) if self.fallback is not None else None

    def report_unused(self, scan: LayoutScan, category: str) -> None:
        for key, rel in sorted(self.by_key.items()):
            if key not in self.used:
                scan.problems.append(Problem("mask", rel, "mask without a matching image", category))


def _valid_category(name: str, rel: str, scan: LayoutScan) -> bool:
    try:
        check_partition_value("category", name)
        return True
    except SchemaError as exc:
        scan.problems.append(Problem("category", rel, f"invalid category name: {exc}", name))
        return False


def _add_images(tree: SourceTree, scan: LayoutScan, rel_dir: str, *, category: str, split: str,
                label: int | None, defect_type: str | None, masks: _MaskIndex | None) -> None:
    for entry in tree.list_dir(rel_dir):
        if entry.escapes:
            scan.problems.append(Problem("image", entry.rel, ESCAPES, category))
        elif entry.is_dir:
            scan.problems.append(Problem("file", entry.rel, "unexpected nested folder (ignored)", category))
        else:
            mask = masks.take(entry.name) if masks is not None else None
            scan.items.append(SourceItem(category, split, label, defect_type, entry.rel, mask))


def _categories(tree: SourceTree, scan: LayoutScan, skip: set[str] = frozenset()) -> list[str]:
    names = []
    for entry in tree.list_dir(""):
        if entry.escapes:
            scan.problems.append(Problem("category", entry.rel, ESCAPES, entry.name))
        elif entry.is_dir and entry.name not in skip and _valid_category(entry.name, entry.rel, scan):
            names.append(entry.name)
    return names


def _finish_category(scan: LayoutScan, category: str, count_before: int, rel: str) -> None:
    scan.categories.append(category)
    if len(scan.items) == count_before and not any(
        p.category == category and p.kind == "image" for p in scan.problems
    ):
        scan.problems.append(Problem("category", rel, "empty category (no images found)", category))


def _scan_defect_tree(tree: SourceTree, *, normal_names: tuple[str, ...]) -> LayoutScan:
    """MVTec AD / MPDD / BTAD: ``<cat>/train/<normal>``, ``<cat>/test/<defect>``,
    ``<cat>/ground_truth/<defect>/<stem>[_mask].<ext>``."""
    scan = LayoutScan()
    for category in _categories(tree, scan):
        before = len(scan.items)
        for split in ("train", "test"):
            for defect in tree.list_dir(f"{category}/{split}"):
                if defect.escapes:
                    scan.problems.append(Problem("file", defect.rel, ESCAPES, category))
                    continue
                if not defect.is_dir:
                    problem = Problem("image", defect.rel, "image outside a defect folder", category)
                    scan.problems.append(problem)
                    continue
                normal = split == "train" or defect.name in normal_names
                masks = _MaskIndex(tree, f"{category}/ground_truth/{defect.name}", scan, category)
                _add_images(tree, scan, defect.rel, category=category, split=split, label=0 if normal else 1,
                            defect_type="good" if normal else defect.name, masks=masks)
                masks.report_unused(scan, category)
        _finish_category(scan, category, before, category)
    return scan


def scan_mvtec(tree: SourceTree) -> LayoutScan:
    return _scan_defect_tree(tree, normal_names=("good",))


def scan_mpdd(tree: SourceTree) -> LayoutScan:
    return _scan_defect_tree(tree, normal_names=("good",))


def scan_btad(tree: SourceTree) -> LayoutScan:
    return _scan_defect_tree(tree, normal_names=("ok", "good"))


FOLDER_SPLITS = {"train": ("train", 0), "normal": ("test", 0), "anomalous": ("test", 1),
                 "unlabeled": ("unlabeled", None)}
FOLDER_UNTYPED_DEFECT = "anomalous"  # defect type of the images directly in ``anomalous/``


def _add_anomalous(tree: SourceTree, scan: LayoutScan, rel_dir: str, *, category: str,
                   masks: _MaskIndex) -> set[str]:
    """``anomalous/*`` (defect type ``anomalous``) and ``anomalous/<defect type>/*``, whose masks come
    from ``masks/<defect type>/`` first, then from ``masks/``; returns the defect types found."""
    types = set()
    for entry in tree.list_dir(rel_dir):
        if entry.escapes:
            scan.problems.append(Problem("image", entry.rel, ESCAPES, category))
        elif entry.is_dir:
            types.add(entry.name)
            typed = masks
            if entry.name in masks.folders:
                typed = _MaskIndex(tree, masks.folders[entry.name], scan, category, fallback=masks)
            _add_images(tree, scan, entry.rel, category=category, split="test", label=1,
                        defect_type=entry.name, masks=typed)
            if typed is not masks:
                typed.report_unused(scan, category)
        else:
            scan.items.append(SourceItem(category, "test", 1, FOLDER_UNTYPED_DEFECT, entry.rel,
                                         masks.take(entry.name)))
    return types


def scan_folder(tree: SourceTree) -> LayoutScan:
    """Generic ``<cat>/{train,normal,anomalous,masks,unlabeled}``: ``train`` holds normal references,
    ``normal``/``anomalous`` become the labelled test split, ``anomalous/<defect type>/`` sub-folders
    give defect types. Masks: ``masks/<defect type>/<stem>[_mask].<ext>`` for a typed image, else
    ``masks/<stem>[_mask].<ext>`` pairs with any image by stem."""
    scan = LayoutScan()
    for category in _categories(tree, scan):
        before = len(scan.items)
        masks = _MaskIndex(tree, f"{category}/masks", scan, category)
        types: set[str] = set()
        order = {"anomalous": 0, "normal": 1, "train": 2, "unlabeled": 3}  # masks belong to anomalous first
        for entry in sorted(tree.list_dir(category), key=lambda e: (order.get(e.name, 9), e.name)):
            if entry.name == "masks":
                continue
            if entry.name not in FOLDER_SPLITS or not entry.is_dir:
                scan.problems.append(Problem("file", entry.rel, "unexpected entry (expected train, normal, "
                                             "anomalous, masks, unlabeled)", category))
                continue
            if entry.name == "anomalous":
                types = _add_anomalous(tree, scan, entry.rel, category=category, masks=masks)
                continue
            split, label = FOLDER_SPLITS[entry.name]
            _add_images(tree, scan, entry.rel, category=category, split=split, label=label,
                        defect_type="good" if label == 0 else None, masks=masks)
        for name, rel in sorted(masks.folders.items()):
            if name not in types:
                scan.problems.append(Problem("mask", rel, f"mask folder without a matching anomalous/{name} "
                                             "folder", category))
        masks.report_unused(scan, category)
        _finish_category(scan, category, before, category)
    return scan


VISA_CSV = "split_csv/1cls.csv"
VISA_ANNOTATIONS = "image_anno.csv"  # per category: image, label (the defect description), mask
VISA_ANNOTATIONS_MAX_BYTES = 64 << 20
_VISA_LABELS = {"normal": 0, "good": 0, "0": 0, "anomaly": 1, "anomalous": 1, "1": 1}


def _visa_defect_types(tree: SourceTree, scan: LayoutScan, category: str) -> dict[str, str]:
    """Image path -> defect type from ``<category>/image_anno.csv`` (its ``label``, e.g. ``scratch`` or
    ``melt,scratch`` for several; ``normal`` rows left out); {} when the file is absent or unusable."""
    rel = f"{category}/{VISA_ANNOTATIONS}"
    if not tree.exists(rel):
        return {}
    try:
        rows = list(csv.DictReader(io.StringIO(tree.read(rel, max_bytes=VISA_ANNOTATIONS_MAX_BYTES)
                                               .decode("utf-8-sig"))))
    except (OSError, ValueError, csv.Error) as exc:  # escapes, non-regular, too large, not text
        scan.problems.append(Problem("file", rel, f"unreadable annotations (defect types not read): {exc}",
                                     category))
        return {}
    if rows and not {"image", "label"} <= set(rows[0]):
        scan.problems.append(Problem("file", rel, "annotations without image and label columns (defect "
                                     "types not read)", category))
        return {}
    types = {}
    for row in rows:
        image, label = (row["image"] or "").strip(), (row["label"] or "").strip()
        if image and label and label.lower() not in _VISA_LABELS:
            types[posixpath.normpath(image)] = ",".join(part.strip() for part in label.split(","))
    return types


def scan_visa(tree: SourceTree) -> LayoutScan:
    """VisA: ``split_csv/1cls.csv`` with columns object, split, label, image, mask (paths from the root);
    defect types of anomalies from ``<category>/image_anno.csv`` where present (else None)."""
    scan = LayoutScan()
    if not tree.exists(VISA_CSV):
        raise FileNotFoundError(f"VisA layout needs {VISA_CSV} under the source root")
    reader = csv.DictReader(io.StringIO(tree.read(VISA_CSV).decode("utf-8-sig")))
    missing = {"object", "split", "label", "image", "mask"} - set(reader.fieldnames or [])
    if missing:
        raise ValueError(f"{VISA_CSV}: missing columns {sorted(missing)}")
    counts: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        category, image = (row["object"] or "").strip(), (row["image"] or "").strip()
        where = f"{VISA_CSV}:{line}"
        if category not in counts:
            if not _valid_category(category, where, scan):
                continue
            counts[category] = 0
        split = (row["split"] or "").strip().lower()
        label = _VISA_LABELS.get((row["label"] or "").strip().lower())
        if split not in ("train", "test") or label is None or not image:
            reason = f"bad CSV row {where}: split={row['split']!r} label={row['label']!r}"
            scan.problems.append(Problem("image", image or where, reason, category))
            continue
        try:
            image = tree.check_inside(image)
            mask = (row["mask"] or "").strip() or None
            mask = tree.check_inside(mask) if mask else None
        except SourceEscapeError as exc:
            scan.problems.append(Problem("image", image, f"symlink or path escapes the source tree: {exc}",
                                         category))
            continue
        counts[category] += 1
        scan.items.append(SourceItem(category, split, label, "good" if label == 0 else None, image, mask))
    for category, count in counts.items():
        scan.categories.append(category)
        if count == 0 and not any(p.category == category and p.kind == "image" for p in scan.problems):
            scan.problems.append(Problem("category", category, "empty category (no images found)", category))
    types = {category: _visa_defect_types(tree, scan, category) for category in counts}
    scan.items = [replace(item, defect_type=types[item.category].get(posixpath.normpath(item.image)))
                  if item.label == 1 else item for item in scan.items]
    return scan


SCANNERS: dict[str, Callable[[SourceTree], LayoutScan]] = {
    "mvtec": scan_mvtec, "mpdd": scan_mpdd, "btad": scan_btad, "visa": scan_visa, "folder": scan_folder,
}


def scan_source(tree: SourceTree, layout: str) -> LayoutScan:
    if layout not in SCANNERS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return SCANNERS[layout](tree)
