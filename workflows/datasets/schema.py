"""The residual-ad Parquet dataset schema: columns, partition keys and the schema version."""

from __future__ import annotations

import hashlib
import re

import pyarrow as pa

SCHEMA_VERSION = 1
SCHEMA_VERSION_KEY = b"residual_ad.schema_version"
MANIFEST_NAME = "_manifest.json"
MANIFEST_FORMAT = "residual-ad-dataset"

PARTITION_KEYS: tuple[str, ...] = ("dataset", "category", "split")
SPLITS: tuple[str, ...] = ("train", "test", "unlabeled")

#: column -> what it holds (rendered into docs/dataset-format.md)
COLUMN_DOCS: dict[str, str] = {
    "image_id": "stable content hash of the original image bytes (sha256, first 32 hex digits)",
    "dataset": "source dataset name (hive partition key)",
    "category": "object / texture category (hive partition key)",
    "split": "train, test or unlabeled (hive partition key)",
    "label": "0 normal, 1 anomalous, null unknown",
    "defect_type": "defect folder name ('good' for normal images); null when unknown",
    "image": "the original encoded image bytes, unchanged",
    "mask": "PNG bytes of the ground-truth mask (nonzero = anomalous); null where there is none",
    "width": "image width in pixels (read from the header at ingest)",
    "height": "image height in pixels",
    "source": "relative path of the image in the source tree",
}

# Columns stored inside the Parquet files. The partition keys live in the directory names only
# (dataset=/category=/split=), which is how pyarrow, pandas, polars and DuckDB expect hive data.
FILE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.int8()),
        pa.field("defect_type", pa.string()),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("mask", pa.binary()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ],
    metadata={SCHEMA_VERSION_KEY: str(SCHEMA_VERSION).encode()},
)
PARTITION_SCHEMA = pa.schema([pa.field(key, pa.string()) for key in PARTITION_KEYS])
#: the full logical schema a reader returns (partition columns after the file columns)
DATASET_SCHEMA = pa.schema(list(FILE_SCHEMA) + list(PARTITION_SCHEMA), metadata=FILE_SCHEMA.metadata)
COLUMNS: tuple[str, ...] = tuple(DATASET_SCHEMA.names)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class SchemaError(ValueError):
    """A row does not fit the dataset schema."""


def content_id(image_bytes: bytes) -> str:
    """The stable image id: sha256 of the original bytes, first 32 hex digits (128 bits)."""
    return hashlib.sha256(image_bytes).hexdigest()[:32]


def check_partition_value(key: str, value: object) -> str:
    """Partition values become directory names: restrict them to a safe character set."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise SchemaError(
            f"{key}={value!r}: must be a non-empty name of letters, digits, '_', '.', '+', '-' "
            "starting with a letter or digit"
        )
    if key == "split" and value not in SPLITS:
        raise SchemaError(f"split={value!r}: must be one of {', '.join(SPLITS)}")
    return value


def partition_dir(dataset: str, category: str, split: str) -> str:
    """Relative directory of one partition: ``dataset=D/category=C/split=S``."""
    return f"dataset={dataset}/category={category}/split={split}"


def normalize_row(row: dict) -> dict:
    """Validate one row dict and fill ``image_id`` when omitted. Raises ``SchemaError``."""
    where = row.get("source") or row.get("image_id") or "<row>"
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise SchemaError(f"{where}: unknown columns {sorted(unknown)}")
    image = row.get("image")
    if not isinstance(image, (bytes, bytearray, memoryview)) or len(image) == 0:
        raise SchemaError(f"{where}: 'image' must be non-empty bytes")
    image = bytes(image)
    try:
        out = {key: check_partition_value(key, row.get(key)) for key in PARTITION_KEYS}
    except SchemaError as exc:
        raise SchemaError(f"{where}: {exc}") from None
    label = row.get("label")
    if label is not None and label not in (0, 1):
        raise SchemaError(f"{where}: label must be 0, 1 or None, got {label!r}")
    mask = row.get("mask")
    if mask is not None and not isinstance(mask, (bytes, bytearray, memoryview)):
        raise SchemaError(f"{where}: 'mask' must be PNG bytes or None")
    for key in ("width", "height"):
        if not isinstance(row.get(key), int) or row[key] <= 0:
            raise SchemaError(f"{where}: {key} must be a positive int, got {row.get(key)!r}")
    if not isinstance(row.get("source"), str):
        raise SchemaError(f"{where}: 'source' must be a string")
    out.update(
        image_id=row.get("image_id") or content_id(image),
        label=None if label is None else int(label),
        defect_type=row.get("defect_type"),
        image=image,
        mask=None if mask is None else bytes(mask),
        width=int(row["width"]),
        height=int(row["height"]),
        source=row["source"],
    )
    return out
