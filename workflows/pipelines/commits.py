"""The one commit layer: per-shard outputs under one URL, each shard committed by a marker written last.

A shard's output files are written first (each atomically), then its marker `done/<shard>.json`; a
shard is committed iff its marker exists. A rerun skips committed shards and rewrites the others under
the same names (overwriting any half-written outputs), so no image is ever counted twice. `evaluate`
(`ShardStore`, below) and `scan` (`scan_outputs.ScanStore`) lay out their files on top of it.
"""

from __future__ import annotations

import io
import json
import pickle

import pyarrow as pa
import pyarrow.parquet as pq

from workflows import storage
from workflows.pipelines.shards import Shard


class CommitStore:
    """Shard outputs and commit markers under `url`."""

    def __init__(self, url: str) -> None:
        self.url = url

    def done_url(self, shard_id: str) -> str:
        return storage.join(self.url, "done", f"{shard_id}.json")

    def done_ids(self) -> set[str]:
        names = storage.list_urls(storage.join(self.url, "done"))
        return {url.rsplit("/", 1)[-1].removesuffix(".json") for url in names if url.endswith(".json")}

    def is_done(self, shard_id: str) -> bool:
        return storage.exists(self.done_url(shard_id))

    def marker(self, shard_id: str) -> dict:
        return json.loads(storage.read_bytes(self.done_url(shard_id)))

    def commit_marker(self, shard_id: str, marker: dict) -> None:
        """The commit: written after every output of the shard."""
        storage.atomic_write_json(self.done_url(shard_id), marker)

    @staticmethod
    def write_parquet(url: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        storage.atomic_write_bytes(url, buffer.getvalue())

    @staticmethod
    def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(storage.read_bytes(url)), columns=columns)

    @staticmethod
    def write_npz(url: str, arrays: dict) -> None:
        import numpy as np

        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        storage.atomic_write_bytes(url, buffer.getvalue())

    @staticmethod
    def read_npz(url: str) -> dict:
        import numpy as np

        with np.load(io.BytesIO(storage.read_bytes(url))) as data:
            return {key: data[key] for key in data.files}


class ShardStore(CommitStore):
    """Outputs of one evaluation job under `job_url`: results/, states/, maps/, done/ per shard, and
    for set-normalised methods raw/ per shard and reduced/ per category."""

    @property
    def job_url(self) -> str:
        return self.url

    def _url(self, kind: str, shard_id: str, suffix: str) -> str:
        return storage.join(self.url, kind, f"{shard_id}{suffix}")

    def commit(self, shard: Shard, results: pa.Table, state: dict, maps: dict | None, summary: dict,
               raw: dict | None = None) -> None:
        """Write results, state, maps and raw outputs, then the commit marker (last)."""
        sid = shard.shard_id
        self.write_outputs(sid, results, state, maps)
        if raw is not None:
            self.write_npz(self._url("raw", sid, ".npz"), raw)
        self.commit_marker(sid, {"shard": shard.to_dict(), **summary})

    def write_outputs(self, shard_id: str, results: pa.Table, state: dict, maps: dict | None) -> None:
        """Per-image results, metric state and maps of a shard (each written atomically)."""
        self.write_parquet(self._url("results", shard_id, ".parquet"), results)
        storage.atomic_write_bytes(self._url("states", shard_id, ".pkl"), pickle.dumps(state))
        if maps:
            self.write_npz(self._url("maps", shard_id, ".npz"), maps)

    def raw(self, shard_id: str) -> dict:
        """The raw outputs (`shard_outputs.pack_raw`) of a shard scored for a set-normalised method."""
        return self.read_npz(self._url("raw", shard_id, ".npz"))

    def reduced_url(self, dataset: str, category: str) -> str:
        """Commit marker of a category's reduce step (set-normalised methods)."""
        return storage.join(self.url, "reduced", f"{dataset}={category}.json")

    def summary(self, shard_id: str) -> dict:
        return self.marker(shard_id)

    def state(self, shard_id: str) -> dict:
        # our own output, written by ShardStore.commit of this job
        return pickle.loads(storage.read_bytes(self._url("states", shard_id, ".pkl")))

    def results_url(self) -> str:
        return storage.join(self.url, "results")

    def read_results(self, shard_ids: list[str] | None = None) -> pa.Table:
        """All committed per-image results (sorted by image_id; for tests and small runs)."""
        ids = sorted(shard_ids if shard_ids is not None else self.done_ids())
        tables = [self.read_parquet(self._url("results", sid, ".parquet")) for sid in ids]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables, promote_options="default").sort_by("image_id")
