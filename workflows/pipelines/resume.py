"""Idempotent shards: how evaluation work is cut, read, committed and resumed.

A shard is a fixed row range of one committed Parquet file of one (dataset, category, split)
partition. Its id hashes the file name, its size and the range, so the same data and shard size
always give the same shards. A shard's outputs (per-image results, metric-accumulator state,
optional anomaly maps) are written first and its commit marker last; a rerun skips every shard
whose marker exists and redoes the others (overwriting any half-written outputs under the same
names), so no image is ever counted twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
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


class ShardStore:
    """Outputs of one evaluation job under `job_url`: results/, states/, maps/, done/ per shard, and
    for set-normalised methods raw/ per shard and reduced/ per category."""

    def __init__(self, job_url: str) -> None:
        self.job_url = job_url

    def _url(self, kind: str, shard_id: str, suffix: str) -> str:
        return storage.join(self.job_url, kind, f"{shard_id}{suffix}")

    def done_ids(self) -> set[str]:
        names = storage.list_urls(storage.join(self.job_url, "done"))
        return {url.rsplit("/", 1)[-1].removesuffix(".json") for url in names if url.endswith(".json")}

    def is_done(self, shard_id: str) -> bool:
        return storage.exists(self._url("done", shard_id, ".json"))

    def commit(self, shard: Shard, results: pa.Table, state: dict, maps: dict | None, summary: dict,
               raw: dict | None = None) -> None:
        """Write results, state, maps and raw outputs, then the commit marker (last)."""
        sid = shard.shard_id
        self.write_outputs(sid, results, state, maps)
        if raw is not None:
            self._write_npz(self._url("raw", sid, ".npz"), raw)
        storage.atomic_write_json(self._url("done", sid, ".json"), {"shard": shard.to_dict(), **summary})

    def write_outputs(self, shard_id: str, results: pa.Table, state: dict, maps: dict | None) -> None:
        """Per-image results, metric state and maps of a shard (each written atomically)."""
        buffer = io.BytesIO()
        pq.write_table(results, buffer, compression="zstd")
        storage.atomic_write_bytes(self._url("results", shard_id, ".parquet"), buffer.getvalue())
        storage.atomic_write_bytes(self._url("states", shard_id, ".pkl"), pickle.dumps(state))
        if maps:
            self._write_npz(self._url("maps", shard_id, ".npz"), maps)

    @staticmethod
    def _write_npz(url: str, arrays: dict) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        storage.atomic_write_bytes(url, buffer.getvalue())

    def raw(self, shard_id: str) -> dict:
        """The raw outputs (`scoring.pack_raw`) of a shard scored for a set-normalised method."""
        import numpy as np

        with np.load(io.BytesIO(storage.read_bytes(self._url("raw", shard_id, ".npz")))) as data:
            return {key: data[key] for key in data.files}

    def reduced_url(self, dataset: str, category: str) -> str:
        """Commit marker of a category's reduce step (set-normalised methods)."""
        return storage.join(self.job_url, "reduced", f"{dataset}={category}.json")

    def summary(self, shard_id: str) -> dict:
        return json.loads(storage.read_bytes(self._url("done", shard_id, ".json")))

    def state(self, shard_id: str) -> dict:
        # our own output, written by ShardStore.commit of this job
        return pickle.loads(storage.read_bytes(self._url("states", shard_id, ".pkl")))

    def results_url(self) -> str:
        return storage.join(self.job_url, "results")

    def read_results(self, shard_ids: list[str] | None = None) -> pa.Table:
        """All committed per-image results (sorted by image_id; for tests and small runs)."""
        ids = sorted(shard_ids if shard_ids is not None else self.done_ids())
        tables = [pq.read_table(io.BytesIO(storage.read_bytes(self._url("results", sid, ".parquet"))))
                  for sid in ids]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default").sort_by("image_id")
