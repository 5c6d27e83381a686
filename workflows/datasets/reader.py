"""Read a residual-ad Parquet dataset: exactly the files its manifest commits, streamed if wanted.

Parquet scans go through pyarrow's native filesystem (native S3 for ``s3://``), which is faster than
s3fs for Parquet (see ``benchmarks/parquet_s3.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from workflows import storage
from workflows.datasets.schema import DATASET_SCHEMA, MANIFEST_NAME, PARTITION_SCHEMA
from workflows.datasets.writer import load_manifest

Filters = ds.Expression | Sequence[Any] | None


class DatasetNotFoundError(FileNotFoundError):
    """No committed dataset (no manifest) at the URL."""


def require_manifest(url: str) -> dict[str, Any]:
    manifest = load_manifest(url)
    if manifest is None:
        raise DatasetNotFoundError(
            f"no committed residual-ad dataset at {storage.redact(url)} (missing {MANIFEST_NAME}; "
            "an interrupted write never commits one)"
        )
    return manifest


def _to_expression(filters: Filters) -> ds.Expression | None:
    """Accept a pyarrow expression or pandas-style DNF tuples ``[("split", "==", "test"), ...]``."""
    if filters is None or isinstance(filters, ds.Expression):
        return filters
    if len(filters) == 0:
        return None
    return pq.filters_to_expression(list(filters))


def open_dataset(url: str) -> ds.Dataset:
    """A pyarrow Dataset over the committed files (hive partition columns included)."""
    manifest = require_manifest(url)
    filesystem, root = storage.arrow_filesystem(url)
    files = [f"{root}/{rel}" for part in manifest["partitions"] for rel in part["files"]]
    return ds.dataset(
        files,
        schema=DATASET_SCHEMA,
        format="parquet",
        filesystem=filesystem,
        partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
        partition_base_dir=root,
    )


def read_table(url: str, columns: Sequence[str] | None = None, filters: Filters = None) -> pa.Table:
    """Read the (filtered, projected) dataset into one Arrow table."""
    dataset = open_dataset(url)
    return storage.with_retries(
        lambda: dataset.to_table(columns=list(columns) if columns else None, filter=_to_expression(filters)),
        what=f"read dataset {url}",
    )


def iter_batches(
    url: str,
    columns: Sequence[str] | None = None,
    filters: Filters = None,
    batch_size: int = 64,
) -> Iterator[pa.RecordBatch]:
    """Stream record batches of at most ``batch_size`` rows with little read-ahead (bounded memory)."""
    dataset = open_dataset(url)
    scanner = dataset.scanner(
        columns=list(columns) if columns else None,
        filter=_to_expression(filters),
        batch_size=batch_size,
        batch_readahead=1,
        fragment_readahead=1,
    )
    yield from scanner.to_batches()


def list_partitions(url: str) -> list[tuple[str, str, str]]:
    """Committed partitions as sorted (dataset, category, split) tuples."""
    manifest = require_manifest(url)
    return sorted((p["dataset"], p["category"], p["split"]) for p in manifest["partitions"])


def read_manifest(url: str) -> dict[str, Any]:
    """The dataset manifest (counts per partition, schema version, extra sections)."""
    return require_manifest(url)


def pixel_ground_truth(url: str, split: str = "test") -> dict[tuple[str, str], bool]:
    """(dataset, category) -> whether that partition of `split` has pixel ground truth.

    Read from the manifest's per-partition `pixel_ground_truth` (written since the field exists);
    an older manifest falls back to "the partition has at least one mask"."""
    manifest = require_manifest(url)
    return {(p["dataset"], p["category"]): bool(p.get("pixel_ground_truth", p.get("masks", 0) > 0))
            for p in manifest["partitions"] if p["split"] == split}
