"""Ingest a source tree into the Parquet dataset format, quarantining bad inputs by path and reason."""

from __future__ import annotations

import io
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from residual_core.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_mask, probe_size
from workflows import storage
from workflows.datasets.schema import check_partition_value, content_id
from workflows.datasets.writer import WriteReport, load_manifest, write_dataset
from workflows.ingest.layouts import LayoutScan, SourceItem, pixel_ground_truth_of, scan_source
from workflows.ingest.quarantine import Problem, QuarantineReport, write_report
from workflows.ingest.source import NotRegularFileError, SourceEscapeError, SourceTree

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NO_MASK_WARNING = "anomalous image without a mask (kept; excluded from pixel metrics)"


class StrictIngestError(RuntimeError):
    """``--strict`` ingest found quarantined inputs; nothing was committed."""


@dataclass(frozen=True)
class IngestOptions:
    layout: str
    dataset: str | None = None   # default: the layout name (folder: the source directory's name)
    strict: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int = 4
    progress: bool = True


@dataclass
class IngestResult:
    report: QuarantineReport
    report_url: str
    write: WriteReport | None


def default_dataset_name(source_url: str, layout: str) -> str:
    if layout != "folder":
        return layout
    base = str(source_url).rstrip("/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", base).lstrip("._-+") or "folder"


def _as_png(mask_bytes: bytes, mask: np.ndarray) -> bytes:
    """Masks are stored as PNG: keep PNG sources as they are, re-encode others as 0/255 grayscale."""
    if mask_bytes.startswith(PNG_SIGNATURE):
        return mask_bytes
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, "PNG")
    return buffer.getvalue()


def _validate(tree: SourceTree, item: SourceItem, dataset: str,
              max_pixels: int) -> tuple[dict | None, Problem | None, Problem | None]:
    """-> (row, quarantine problem, warning). Exactly one of row / problem is set."""

    def fail(reason: str) -> tuple[None, Problem, None]:
        return None, Problem("image", item.image, reason, item.category), None

    try:
        data = tree.read(item.image)
    except SourceEscapeError as exc:
        return fail(f"symlink or path escapes the source tree: {exc}")
    except NotRegularFileError as exc:  # a FIFO, device, socket: refused unopened (it could block)
        return fail(f"not a regular file: {exc}")
    except FileNotFoundError:
        return fail("file not found")
    except (OSError, storage.StorageError) as exc:
        return fail(f"unreadable file: {type(exc).__name__}: {storage.redact(exc)}")
    if not data:
        return fail("empty file (zero bytes)")
    try:
        width, height = probe_size(data, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return fail(exc.reason)
    mask_png, warning = None, None
    if item.mask is not None:
        if item.label != 1:
            kind = "normal" if item.label == 0 else "unlabeled"
            return fail(f"mask present for a {kind} image: {item.mask}")
        try:
            mask_bytes = tree.read(item.mask)
            mask = decode_mask(mask_bytes, (width, height), max_pixels=max_pixels)
        except SourceEscapeError as exc:
            return fail(f"mask escapes the source tree: {exc}")
        except FileNotFoundError:
            return fail(f"mask file not found: {item.mask}")
        except ImageDecodeError as exc:
            return fail(f"bad mask: {exc.reason} ({item.mask})")
        mask_png = _as_png(mask_bytes, mask)
    elif item.label == 1:
        warning = Problem("image", item.image, NO_MASK_WARNING, item.category)
    row = {
        "image_id": content_id(data), "dataset": dataset, "category": item.category, "split": item.split,
        "label": item.label, "defect_type": item.defect_type, "image": data, "mask": mask_png,
        "width": width, "height": height, "source": item.image,
    }
    return row, None, warning


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=None if enabled else True, leave=False)


def _rows(tree: SourceTree, scan: LayoutScan, report: QuarantineReport, options: IngestOptions,
          dataset: str) -> Iterator[dict]:
    """Validate items in parallel (order kept) and yield rows; problems go into ``report``."""
    seen_ids: dict[tuple[str, str, str], str] = {}
    with_references: set[str] = set()
    chunk = max(8, options.workers * 4)
    with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool, \
            _progress(len(scan.items), options.progress, f"ingest {dataset}") as bar:
        for start in range(0, len(scan.items), chunk):
            batch = scan.items[start:start + chunk]
            results = pool.map(lambda it: _validate(tree, it, dataset, options.max_pixels), batch)
            for item, (row, problem, warning) in zip(batch, results, strict=True):
                bar.update(1)
                if problem is not None:
                    report.add(problem)
                    continue
                key = (item.category, item.split, row["image_id"])
                if key in seen_ids:
                    reason = f"duplicate image: same content as {seen_ids[key]}"
                    report.add(Problem("image", item.image, reason, item.category))
                    continue
                seen_ids[key] = item.image
                if warning is not None:
                    report.warnings.append(warning)
                report.written += 1
                if item.split == "train" and row["label"] in (0, None):
                    with_references.add(item.category)
                yield row
    report.without_references = sorted(set(scan.categories) - with_references)
    if options.strict and (report.quarantined or report.other_problems or report.without_references):
        raise StrictIngestError(
            f"--strict: {len(report.quarantined)} quarantined images, {len(report.other_problems)} other "
            f"problems and {len(report.without_references)} categories without normal train images"
            + (f" ({', '.join(report.without_references)})" if report.without_references else "")
            + "; nothing was written"
        )


def ingest(source_url: str, dest_url: str, options: IngestOptions) -> IngestResult:
    """Scan ``source_url`` in ``options.layout``, write valid images to ``dest_url``, report the rest.

    Re-ingesting replaces this dataset's partitions of every scanned category atomically. With
    ``strict`` any problem aborts before the commit (the report is still written)."""
    dataset = options.dataset or default_dataset_name(source_url, options.layout)
    check_partition_value("dataset", dataset)
    tree = SourceTree(source_url)
    scan = scan_source(tree, options.layout)
    if not scan.categories and not scan.problems:
        where = storage.redact(source_url)
        raise ValueError(f"{where}: no categories found for the {options.layout!r} layout")
    report = QuarantineReport(dataset=dataset, layout=options.layout, source=str(source_url))
    for problem in scan.problems:
        report.add(problem)
    report.seen = len(scan.items) + sum(p.kind == "image" for p in scan.problems)
    previous = load_manifest(dest_url) or {"partitions": []}
    stale = [(p["dataset"], p["category"], p["split"]) for p in previous["partitions"]
             if p["dataset"] == dataset and p["category"] in set(scan.categories)]
    write: WriteReport | None = None
    try:
        write = write_dataset(
            _rows(tree, scan, report, options, dataset), dest_url, replace_partitions=stale,
            pixel_ground_truth=lambda _dataset, _category: pixel_ground_truth_of(options.layout),
            extra_metadata=lambda: {f"ingest:{dataset}": {
                "layout": options.layout, "seen": report.seen, "written": report.written,
                "quarantined": len(report.quarantined), "kept_with_warnings": len(report.warnings),
                "quarantine_report": f"_quarantine/{dataset}.json",
            }},
        )
    except StrictIngestError:
        report.written = 0
        write_report(report, dest_url)
        raise
    return IngestResult(report=report, report_url=write_report(report, dest_url), write=write)
