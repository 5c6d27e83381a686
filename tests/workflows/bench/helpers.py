"""Reading a built benchmark back for the tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from workflows import storage
from workflows.bench.manifest import MANIFEST_PATH
from workflows.datasets import read_table


def rows(url: str) -> list[dict]:
    return read_table(url).to_pylist()


def bench_manifest(url: str) -> dict:
    return storage.read_json(storage.join(url, MANIFEST_PATH))


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def partition_file_bytes(url: str) -> dict[tuple[str, str, str], list[bytes]]:
    """Parquet file contents per partition, in the order the dataset manifest lists them."""
    manifest = storage.read_json(storage.join(url, "_manifest.json"))
    return {(p["dataset"], p["category"], p["split"]):
            [storage.read_bytes(storage.join(url, f)) for f in p["files"]]
            for p in manifest["partitions"]}
