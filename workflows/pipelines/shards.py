"""Idempotent shards: how dataset work is cut and read.

A shard is a fixed row range of one committed Parquet file of one (dataset, category, split)
partition. Its id hashes the file name, its size and the range, so the same data and shard size
always give the same shards, and a rerun finds the shards it committed before (`commits.py`).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from workflows import storage
from workflows.datasets.reader import read_manifest

SHARD_COLUMNS = ("image_id", "label", "defect_type", "image", "mask", "width", "height", "source")


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of one Parquet file of one partition."""

    dataset: str
    category: str
    split: str
    file_url: str
    file_rel: str  # path relative to the dataset root (stable across storage locations)
    file_bytes: int
    start: int
    stop: int

    @property
    def shard_id(self) -> str:
        text = f"{self.file_rel}|{self.file_bytes}|{self.start}|{self.stop}"
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Shard:
        return cls(**data)


def plan_shards(
    data_url: str,
    *,
    split: str,
    shard_size: int,
    datasets: list[str] | None = None,
    categories: list[str] | None = None,
) -> list[Shard]:
    """Cut the committed files of the selected partitions into shards of `shard_size` rows.

    Reads only the manifest and the Parquet footers (row counts), never image data."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    manifest = read_manifest(data_url)
    filesystem, root = storage.arrow_filesystem(data_url)
    shards: list[Shard] = []
    for part in sorted(manifest["partitions"], key=lambda p: (p["dataset"], p["category"], p["split"])):
        if part["split"] != split:
            continue
        if datasets and part["dataset"] not in datasets:
            continue
        if categories and part["category"] not in categories:
            continue
        for rel in sorted(part["files"]):
            path = f"{root}/{rel}"
            info = filesystem.get_file_info(path)
            rows = storage.with_retries(
                lambda path=path: pq.ParquetFile(path, filesystem=filesystem).metadata.num_rows,
                what=f"read footer of {rel}",
            )
            for start in range(0, rows, shard_size):
                shards.append(
                    Shard(part["dataset"], part["category"], part["split"], storage.join(data_url, rel), rel,
                          int(info.size), start, min(start + shard_size, rows))
                )
    return shards


def read_shard(shard: Shard, columns: tuple[str, ...] = SHARD_COLUMNS) -> pa.Table:
    """The shard's rows (only `columns`), reading just the row groups that overlap its range."""
    filesystem, path = storage.arrow_filesystem(shard.file_url)

    def _read() -> pa.Table:
        parquet = pq.ParquetFile(path, filesystem=filesystem)
        groups, offset, first_offset = [], 0, None
        for index in range(parquet.metadata.num_row_groups):
            rows = parquet.metadata.row_group(index).num_rows
            if offset < shard.stop and offset + rows > shard.start:
                groups.append(index)
                first_offset = offset if first_offset is None else first_offset
            offset += rows
        table = parquet.read_row_groups(groups, columns=list(columns))
        return table.slice(shard.start - (first_offset or 0), shard.stop - shard.start)

    return storage.with_retries(_read, what=f"read shard {shard.file_rel}[{shard.start}:{shard.stop}]")
