"""The residual-ad Parquet dataset format: schema, atomic writer and manifest-driven reader."""

from workflows.datasets.reader import (
    DatasetNotFoundError,
    iter_batches,
    list_partitions,
    open_dataset,
    read_manifest,
    read_table,
)
from workflows.datasets.schema import COLUMNS, PARTITION_KEYS, SCHEMA_VERSION, SPLITS, SchemaError, content_id
from workflows.datasets.writer import (
    DatasetFormatError,
    PartitionWrite,
    WriteConfig,
    WriteReport,
    load_manifest,
    write_dataset,
)

__all__ = [
    "COLUMNS", "PARTITION_KEYS", "SCHEMA_VERSION", "SPLITS", "DatasetFormatError", "DatasetNotFoundError",
    "PartitionWrite", "SchemaError", "WriteConfig", "WriteReport", "content_id", "iter_batches",
    "list_partitions", "load_manifest", "open_dataset", "read_manifest", "read_table", "write_dataset",
]
