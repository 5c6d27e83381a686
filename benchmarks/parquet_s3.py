"""Parquet scans on S3: pyarrow's native S3FileSystem vs s3fs, side by side in one run.

Starts moto's S3 server on 127.0.0.1, writes a residual-ad dataset of random "image" payloads with
the project's writer, then times the same scans through both filesystems (median of repeats):
a full scan (all columns, images included) and a metadata-only projection (image_id, label, split).

    .venv/bin/python benchmarks/parquet_s3.py [--rows 240] [--kb 200] [--repeats 3]

Against a local moto server there is no network latency, so the ratio reflects client overheads
(request count, range-read strategy, threading), not WAN bandwidth.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rows(count: int, kilobytes: int):
    rng = __import__("numpy").random.default_rng(0)
    for i in range(count):
        yield {
            "dataset": "bench", "category": f"c{i % 4}", "split": "test" if i % 3 else "train",
            "label": i % 2, "defect_type": None, "image": rng.bytes(kilobytes * 1024), "mask": None,
            "width": 256, "height": 256, "source": f"c{i % 4}/{i:05d}.png",
        }


def _time(fn, repeats: int) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        rows = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--kb", type=int, default=200, help="payload size of each image in KiB")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import pyarrow.dataset as ds
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from tests.fixtures.s3 import MotoServer
    from workflows import storage
    from workflows.datasets import write_dataset
    from workflows.datasets.reader import open_dataset
    from workflows.datasets.schema import DATASET_SCHEMA, PARTITION_SCHEMA
    from workflows.datasets.writer import WriteConfig, load_manifest

    server = MotoServer().start()
    os.environ.update(server.env())
    storage.clear_cache()
    try:
        server.create_bucket("bench")
        url = "s3://bench/parquet-scan"
        start = time.perf_counter()
        write_dataset(_rows(args.rows, args.kb), url, config=WriteConfig(row_group_max_rows=32))
        write_s = time.perf_counter() - start
        manifest = load_manifest(url)
        files = [f"bench/parquet-scan/{rel}" for p in manifest["partitions"] for rel in p["files"]]
        total_mb = sum(p["bytes"] for p in manifest["partitions"]) / 2**20

        def native(columns):
            return lambda: open_dataset(url).to_table(columns=columns).num_rows

        def via_s3fs(columns):
            def scan() -> int:
                fs, _ = storage.resolve(url)
                dataset = ds.dataset(
                    files, schema=DATASET_SCHEMA, format="parquet",
                    filesystem=PyFileSystem(FSSpecHandler(fs)),
                    partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
                    partition_base_dir="bench/parquet-scan",
                )
                return dataset.to_table(columns=columns).num_rows
            return scan

        print(f"dataset: {args.rows} rows x {args.kb} KiB = {total_mb:.1f} MiB in {len(files)} files "
              f"(written in {write_s:.2f}s); median of {args.repeats} runs; moto on 127.0.0.1")
        print(f"{'scan':<28}{'pyarrow S3 (s)':>16}{'s3fs (s)':>12}{'s3fs/native':>13}{'native MiB/s':>14}")
        scans = (("full (images included)", None), ("metadata only (3 cols)", ["image_id", "label", "split"]))
        for name, columns in scans:
            native_s, n1 = _time(native(columns), args.repeats)
            s3fs_s, n2 = _time(via_s3fs(columns), args.repeats)
            assert n1 == n2 == args.rows, (n1, n2)
            throughput = f"{total_mb / native_s:14.1f}" if columns is None else f"{'-':>14}"
            print(f"{name:<28}{native_s:16.3f}{s3fs_s:12.3f}{s3fs_s / native_s:13.2f}{throughput}")
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
