"""Raw image archives (a local directory or an s3:// prefix) as a stream of scan shards.

The archive is listed directory by directory in sorted order (never all keys at once); the category
is the one given, else the first directory level of each key. Consecutive keys of one category are
cut into shards of `shard_size`; each shard's key list is written to `plan_url/shards/<id>.json` so
that only a small descriptor per shard stays in the driver and goes through Ray.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from workflows import storage

ARCHIVE_DATASET = "archive"  # bank namespace of raw-prefix inputs (Parquet inputs use their dataset names)
NO_CATEGORY = "_no_category"  # files at the archive root when no category is given


@dataclass(frozen=True)
class ScanShard:
    """One unit of scan work: up to `shard_size` images of one category.

    Raw prefixes: `keys_url` names a JSON list of keys relative to `root_url`. Parquet datasets:
    `parquet` holds a `resume.Shard` as a dict (a row range of one file)."""

    dataset: str
    category: str
    shard_id: str
    size: int
    root_url: str | None = None
    keys_url: str | None = None
    parquet: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScanShard:
        return cls(**data)


def iter_archive(url: str, category: str | None = None) -> Iterator[tuple[str, str]]:
    """(category, key relative to `url`) for every file under `url`, sorted, one directory at a time."""
    fs, root = storage.resolve(url)
    if not storage.with_retries(lambda: fs.isdir(root), what=f"list {url}"):
        raise FileNotFoundError(f"archive {storage.redact(url)} is not a directory or prefix")
    root = root.rstrip("/")
    for directory, dirs, files in fs.walk(root, detail=False):
        dirs[:] = sorted(dirs)  # fsspec walks `dirs` after yielding: sorted order, deterministic shards
        rel_dir = directory.rstrip("/")[len(root):].strip("/")
        for name in sorted(files):
            key = f"{rel_dir}/{name}" if rel_dir else name
            if category:
                yield category, key
            else:
                yield (key.split("/", 1)[0] if "/" in key else NO_CATEGORY), key


def _shard_id(category: str, keys: list[str]) -> str:
    digest = hashlib.sha256(json.dumps([category, keys]).encode()).hexdigest()
    return digest[:20]


def plan_archive(url: str, plan_url: str, *, shard_size: int,
                 category: str | None = None) -> Iterator[ScanShard]:
    """Cut the archive into shards, writing each shard's keys under `plan_url/shards/`; yields descriptors."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    current: str | None = None
    keys: list[str] = []

    def flush() -> ScanShard:
        shard_id = _shard_id(current, keys)
        keys_url = storage.join(plan_url, "shards", f"{shard_id}.json")
        storage.atomic_write_json(keys_url, {"category": current, "keys": keys})
        return ScanShard(ARCHIVE_DATASET, current, shard_id, len(keys), root_url=url, keys_url=keys_url)

    for item_category, key in iter_archive(url, category):
        if keys and (item_category != current or len(keys) >= shard_size):
            yield flush()
            keys = []
        current = item_category
        keys.append(key)
    if keys:
        yield flush()


def shard_keys(shard: ScanShard) -> list[str]:
    return list(json.loads(storage.read_bytes(shard.keys_url))["keys"])
