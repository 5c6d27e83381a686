"""The Parquet dataset format: round trip, partitions, manifest, atomic replace, foreign readers, S3."""

from __future__ import annotations

import os

import duckdb
import pyarrow.parquet as pq
import pytest

from tests.fixtures.s3 import FAKE_SECRET
from tests.workflows.datasets.helpers import make_row, png_bytes
from workflows import storage
from workflows.datasets import (
    COLUMNS,
    SCHEMA_VERSION,
    DatasetNotFoundError,
    SchemaError,
    WriteConfig,
    content_id,
    iter_batches,
    list_partitions,
    read_manifest,
    read_table,
    write_dataset,
)


def _rows():
    rows = [make_row(i, category="a", split="train") for i in range(3)]
    rows += [make_row(10 + i, category="a", split="test", label=i % 2, with_mask=i % 2 == 1)
             for i in range(4)]
    rows += [make_row(20 + i, category="b", split="unlabeled", label=None) for i in range(2)]
    return rows


def test_round_trip_columns_partitions_and_manifest(tmp_path):
    dest = str(tmp_path / "data")
    report = write_dataset(_rows(), dest, extra_metadata={"bench": {"samples": [1, 2]}})
    assert report.rows_written == 9
    table = read_table(dest)
    assert set(table.column_names) == set(COLUMNS)
    assert table.num_rows == 9
    assert list_partitions(dest) == [("ds", "a", "test"), ("ds", "a", "train"), ("ds", "b", "unlabeled")]
    rows = {r["source"]: r for r in table.to_pylist()}
    assert rows["a/10.png"]["image"] == png_bytes(10)
    assert rows["a/10.png"]["image_id"] == content_id(png_bytes(10))
    assert rows["a/11.png"]["mask"] is not None and rows["a/10.png"]["mask"] is None
    assert rows["b/20.png"]["label"] is None and rows["b/20.png"]["split"] == "unlabeled"
    manifest = read_manifest(dest)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["extra"] == {"bench": {"samples": [1, 2]}}
    counts = {(p["category"], p["split"]): (p["rows"], p["labels"]) for p in manifest["partitions"]}
    assert counts[("a", "test")] == (4, {"0": 2, "1": 2, "null": 0})
    some_file = os.path.join(dest, manifest["partitions"][0]["files"][0])
    assert pq.read_schema(some_file).metadata[b"residual_ad.schema_version"] == str(SCHEMA_VERSION).encode()


def test_filters_projection_and_streaming_batches(tmp_path):
    dest = str(tmp_path / "data")
    write_dataset(_rows(), dest, config=WriteConfig(row_group_max_rows=2))
    test_only = read_table(dest, columns=["image_id", "label"], filters=[("split", "==", "test")])
    assert test_only.column_names == ["image_id", "label"] and test_only.num_rows == 4
    batches = list(iter_batches(dest, columns=["image_id", "category"], batch_size=2))
    assert all(b.num_rows <= 2 for b in batches)
    assert sum(b.num_rows for b in batches) == 9
    manifest = read_manifest(dest)
    test_file = next(p for p in manifest["partitions"] if p["split"] == "test")["files"][0]
    assert pq.ParquetFile(os.path.join(dest, test_file)).num_row_groups == 2


def test_rewrite_replaces_affected_partitions_only_and_never_duplicates(tmp_path):
    dest = str(tmp_path / "data")
    write_dataset(_rows(), dest)
    write_dataset(_rows()[:3] + [make_row(99, category="a", split="train")], dest)
    write_dataset(_rows()[:3] + [make_row(99, category="a", split="train")], dest)
    table = read_table(dest)
    assert table.num_rows == 10  # 'a/train' now has 4 rows; the other partitions are untouched
    assert len(set(zip(table["image_id"].to_pylist(), table["split"].to_pylist(), strict=True))) == 10
    train_dir = tmp_path / "data" / "dataset=ds" / "category=a" / "split=train"
    assert len(list(train_dir.iterdir())) == 1  # the older files were deleted after the commit


def test_duplicate_content_in_one_partition_is_dropped_and_reported(tmp_path):
    row = make_row(1)
    twin = dict(row, source="cat/copy-of-1.png")
    report = write_dataset([row, twin], str(tmp_path / "d"))
    assert report.rows_written == 1
    assert report.duplicates == [{"source": "cat/copy-of-1.png", "image_id": content_id(row["image"]),
                                  "duplicate_of": "cat/1.png"}]


def test_crash_mid_write_never_looks_complete(tmp_path):
    dest = str(tmp_path / "data")

    def rows_then_crash():
        yield from _rows()
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        write_dataset(rows_then_crash(), dest, config=WriteConfig(row_group_max_rows=1))
    with pytest.raises(DatasetNotFoundError):
        read_table(dest)
    # a crash while replacing keeps the previous committed version intact
    write_dataset(_rows(), dest)
    with pytest.raises(RuntimeError):
        write_dataset(rows_then_crash(), dest, config=WriteConfig(row_group_max_rows=1))
    assert read_table(dest).num_rows == 9
    leftovers = [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.name.endswith(".tmp")]
    assert leftovers == []


def test_bad_rows_are_rejected_with_the_item_named(tmp_path):
    with pytest.raises(SchemaError, match="cat/1.png.*split"):
        write_dataset([dict(make_row(1), split="validation")], str(tmp_path / "d"))
    with pytest.raises(SchemaError, match="category"):
        write_dataset([dict(make_row(1), category="../escape")], str(tmp_path / "d"))
    with pytest.raises(SchemaError, match="label"):
        write_dataset([dict(make_row(1), label=3)], str(tmp_path / "d"))


def test_pandas_and_duckdb_and_polars_read_the_dataset_as_is(tmp_path):
    import pandas as pd
    import polars as pl

    dest = tmp_path / "data"
    write_dataset(_rows(), str(dest))
    frame = pd.read_parquet(dest)
    assert len(frame) == 9 and set(frame["split"].astype(str)) == {"train", "test", "unlabeled"}
    counts = duckdb.sql(
        f"SELECT category, split, count(*) "
        f"FROM read_parquet('{dest}/*/*/*/*.parquet', hive_partitioning=true) "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert counts == [("a", "test", 4), ("a", "train", 3), ("b", "unlabeled", 2)]
    lazy = pl.scan_parquet(f"{dest}/**/*.parquet", hive_partitioning=True)
    assert lazy.filter(pl.col("label") == 1).collect().height == 2


def test_s3_round_trip_through_the_user_code_path(s3_server):
    dest = s3_server.unique_url("dataset")
    write_dataset(_rows(), dest)
    write_dataset(_rows()[:3], dest)  # replace one partition on S3
    assert read_table(dest).num_rows == 9
    assert list_partitions(dest) == [("ds", "a", "test"), ("ds", "a", "train"), ("ds", "b", "unlabeled")]
    assert sum(b.num_rows for b in iter_batches(dest, batch_size=4)) == 9
    manifest_text = storage.read_bytes(storage.join(dest, "_manifest.json")).decode()
    assert FAKE_SECRET not in manifest_text and s3_server.endpoint_url not in manifest_text


def test_row_groups_are_bounded_by_bytes_even_with_interleaved_partitions(tmp_path):
    dest = str(tmp_path / "data")
    payload = 10_000
    rows = [dict(make_row(i, category=f"c{i % 3}"), image=bytes([i % 256]) * payload + i.to_bytes(4, "big"))
            for i in range(30)]
    config = WriteConfig(row_group_bytes=25_000, max_buffered_bytes=40_000)
    write_dataset(rows, dest, config=config)
    for part in read_manifest(dest)["partitions"]:
        metadata = pq.ParquetFile(os.path.join(dest, part["files"][0])).metadata
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert sum(sizes) == 10 and max(sizes) <= 3, sizes
