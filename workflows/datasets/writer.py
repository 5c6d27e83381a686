"""Write rows into a hive-partitioned residual-ad Parquet dataset, replacing partitions atomically.

Commit protocol (works the same on local disks and S3, which has no rename):
1. each partition's rows go to new files ``part-<write_id>-<n>.parquet`` (each file itself is
   written under a hidden temporary name / an uncompleted multipart upload until it is closed);
2. the dataset manifest ``_manifest.json`` is replaced in one atomic write: it lists exactly the
   committed files of every partition, so the new partitions and the removal of the old files of
   the same partitions become visible together;
3. files of the replaced partitions that the manifest no longer lists are deleted.
A crash before step 2 leaves the previous manifest in force (no dataset at all on a first write);
stray files it left are removed by the next write of the same partition.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workflows import storage
from workflows.datasets.schema import (
    FILE_SCHEMA,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    PARTITION_KEYS,
    SCHEMA_VERSION,
    normalize_row,
    partition_dir,
)

PartitionKey = tuple[str, str, str]


@dataclass(frozen=True)
class WriteConfig:
    """Row-group and file sizing: a reader holds about one row group of images in memory."""

    row_group_bytes: int = 32 * 2**20
    row_group_max_rows: int = 256
    file_max_bytes: int = 512 * 2**20
    max_buffered_bytes: int = 128 * 2**20  # over all partitions; the largest buffer is flushed


@dataclass
class PartitionWrite:
    dataset: str
    category: str
    split: str
    rows: int
    files: list[str]
    bytes: int
    labels: dict[str, int]
    masks: int
    # whether the partition's images have pixel ground truth (normal images then count as all-zero
    # masks in pixel metrics); declared by ingest/build-bench, else inferred as `masks > 0`
    pixel_ground_truth: bool = False


@dataclass
class WriteReport:
    dest_url: str
    write_id: str
    partitions: list[PartitionWrite]
    rows_written: int
    duplicates: list[dict[str, str]] = field(default_factory=list)  # {source, image_id, duplicate_of}
    manifest_url: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DatasetFormatError(ValueError):
    """The destination holds something that is not a compatible residual-ad dataset."""


def load_manifest(dest_url: str) -> dict[str, Any] | None:
    """The dataset manifest, or None when no dataset has been committed at ``dest_url``."""
    url = storage.join(dest_url, MANIFEST_NAME)
    if not storage.exists(url):
        return None
    manifest = storage.read_json(url)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetFormatError(f"{storage.redact(url)}: not a residual-ad dataset manifest")
    if int(manifest.get("schema_version", -1)) > SCHEMA_VERSION:
        raise DatasetFormatError(
            f"{storage.redact(url)}: schema version {manifest.get('schema_version')} is newer than "
            f"this code's {SCHEMA_VERSION}"
        )
    return manifest


def _row_bytes(row: dict) -> int:
    return len(row["image"]) + len(row["mask"] or b"") + len(row["source"]) + 64


class _PartitionSink:
    """Buffers one partition's rows and writes them as row groups into rolling files."""

    def __init__(self, key: PartitionKey, dest_url: str, write_id: str, config: WriteConfig,
                 stack: ExitStack) -> None:
        self.key, self.dest_url, self.write_id = key, dest_url, write_id
        self.config, self.stack = config, stack
        self.buffer: list[dict] = []
        self.buffer_bytes = 0
        self.files: list[str] = []
        self.file_bytes = 0
        self.total_bytes = 0
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0
        self.labels = {"0": 0, "1": 0, "null": 0}
        self.masks = 0

    def add(self, row: dict) -> None:
        self.buffer.append(row)
        self.buffer_bytes += _row_bytes(row)
        self.rows += 1
        self.labels["null" if row["label"] is None else str(row["label"])] += 1
        self.masks += row["mask"] is not None
        full = len(self.buffer) >= self.config.row_group_max_rows
        if full or self.buffer_bytes >= self.config.row_group_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        if self.writer is None or self.file_bytes >= self.config.file_max_bytes:
            self._open_file()
        table = pa.Table.from_pylist(
            [{name: row[name] for name in FILE_SCHEMA.names} for row in self.buffer], schema=FILE_SCHEMA
        )
        self.writer.write_table(table, row_group_size=len(self.buffer))
        self.file_bytes += self.buffer_bytes
        self.total_bytes += self.buffer_bytes
        self.buffer, self.buffer_bytes = [], 0

    def _open_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
        rel = f"{partition_dir(*self.key)}/part-{self.write_id}-{len(self.files):05d}.parquet"
        handle = self.stack.enter_context(storage.atomic_open(storage.join(self.dest_url, rel)))
        self.stack.callback(self._abandon)  # runs before the handle commits or discards
        self.writer = pq.ParquetWriter(
            handle,
            FILE_SCHEMA,
            # images and masks are already compressed; the small columns are not
            compression={n: ("none" if n in ("image", "mask") else "zstd") for n in FILE_SCHEMA.names},
            use_dictionary=["defect_type"],
            write_statistics=["image_id", "label", "defect_type", "width", "height", "source"],
        )
        self.files.append(rel)
        self.file_bytes = 0

    def _abandon(self) -> None:
        """On an error path, release the Parquet writer; its temporary file is discarded anyway."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away
                pass

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def summary(self, pixel_ground_truth: bool | None = None) -> PartitionWrite:
        declared = self.masks > 0 if pixel_ground_truth is None else bool(pixel_ground_truth)
        return PartitionWrite(*self.key, rows=self.rows, files=list(self.files), bytes=self.total_bytes,
                              labels=dict(self.labels), masks=self.masks, pixel_ground_truth=declared)


def write_dataset(
    rows: Iterable[dict],
    dest_url: str,
    *,
    extra_metadata: dict | Callable[[], dict] | None = None,
    replace_partitions: Iterable[PartitionKey] = (),
    config: WriteConfig = WriteConfig(),
    pixel_ground_truth: Callable[[str, str], bool | None] | None = None,
) -> WriteReport:
    """Write ``rows`` (dicts with the schema columns; ``image_id`` optional) under ``dest_url``.

    Every partition (dataset, category, split) that receives rows replaces that partition's previous
    content; other partitions are kept. ``replace_partitions`` names partitions to empty even if no
    row arrives for them. Rows with an ``image_id`` already written to the same partition in this
    call are dropped and listed in ``WriteReport.duplicates``. ``extra_metadata`` sections are
    merged into the manifest's ``extra`` object (top-level keys replaced); a callable is evaluated
    after the last row, so it can report on what was consumed. ``pixel_ground_truth(dataset, category)``
    declares whether a partition has pixel ground truth (None or no callable: inferred as "has at
    least one mask"); it is recorded per partition in the manifest."""
    previous = load_manifest(dest_url)
    write_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    sinks: dict[PartitionKey, _PartitionSink] = {}
    seen: dict[PartitionKey, dict[str, str]] = {}
    duplicates: list[dict[str, str]] = []
    with ExitStack() as stack:
        for raw in rows:
            row = normalize_row(raw)
            key: PartitionKey = tuple(row[k] for k in PARTITION_KEYS)  # type: ignore[assignment]
            ids = seen.setdefault(key, {})
            if row["image_id"] in ids:
                duplicates.append({"source": row["source"], "image_id": row["image_id"],
                                   "duplicate_of": ids[row["image_id"]]})
                continue
            ids[row["image_id"]] = row["source"]
            if key not in sinks:
                sinks[key] = _PartitionSink(key, dest_url, write_id, config, stack)
            sinks[key].add(row)
            if sum(s.buffer_bytes for s in sinks.values()) > config.max_buffered_bytes:
                max(sinks.values(), key=lambda s: s.buffer_bytes).flush()
        for sink in sinks.values():
            sink.close()
    # all files are closed (committed); now the manifest switch makes them visible
    declare = pixel_ground_truth or (lambda dataset, category: None)
    written = [sinks[key].summary(declare(key[0], key[1])) for key in sorted(sinks)]
    replaced = set(sinks) | {tuple(k) for k in replace_partitions}
    extra = extra_metadata() if callable(extra_metadata) else extra_metadata
    manifest = _merge_manifest(previous, written, replaced, write_id, extra)
    manifest_url = storage.join(dest_url, MANIFEST_NAME)
    storage.atomic_write_json(manifest_url, manifest)
    _delete_unlisted(dest_url, manifest, replaced)
    return WriteReport(dest_url=storage.redact(dest_url), write_id=write_id, partitions=written,
                       rows_written=sum(p.rows for p in written), duplicates=duplicates,
                       manifest_url=storage.redact(manifest_url))


def _merge_manifest(previous: dict | None, written: list[PartitionWrite], replaced: set,
                    write_id: str, extra: dict | None) -> dict[str, Any]:
    partitions = {
        (p["dataset"], p["category"], p["split"]): p
        for p in (previous or {}).get("partitions", [])
    }
    for key in replaced:
        partitions.pop(tuple(key), None)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for part in written:
        partitions[(part.dataset, part.category, part.split)] = {**asdict(part), "write_id": write_id,
                                                                 "written_at": now}
    ordered = [partitions[key] for key in sorted(partitions)]
    merged_extra = dict((previous or {}).get("extra", {}))
    merged_extra.update(extra or {})
    return {
        "format": MANIFEST_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "partition_keys": list(PARTITION_KEYS),
        "columns": FILE_SCHEMA.names + list(PARTITION_KEYS),
        "updated_at": now,
        "last_write_id": write_id,
        "rows": sum(p["rows"] for p in ordered),
        "partitions": ordered,
        "extra": merged_extra,
    }


def _delete_unlisted(dest_url: str, manifest: dict, replaced: set) -> None:
    """Remove files in the replaced partitions that the committed manifest does not list."""
    listed = {f for p in manifest["partitions"] for f in p["files"]}
    for key in sorted(replaced):
        part_url = storage.join(dest_url, partition_dir(*key))
        for url in storage.list_urls(part_url, recursive=True):
            rel = url[len(dest_url.rstrip("/")) + 1:]
            if rel not in listed:
                storage.remove(url)
