"""Raw image archives (a local directory or an s3:// prefix) as a stream of scan shards.

The archive is listed directory by directory in sorted order (never all keys at once); the category
is the one given, else the first directory level of each key. Consecutive keys of one category are
cut into shards of `shard_size`; each shard's key list is written to `plan_url/shards/<id>.json` so
that only a small descriptor per shard stays in the driver and goes through Ray.

Archives come from elsewhere and are treated as hostile: listing and reading go through
`workflows.ingest.source.SourceTree`. Every entry that is not a real directory is listed (so it is
counted: seen = scored + skipped); symlinks are never walked. `read_items` reads only regular files
inside the archive, bounded in bytes and time, and turns every refusal into a one-line reason:

- a symlink resolving outside the archive (file, directory, /dev/zero, ...): refused from its
  resolved path, its target never opened; a symlink to a regular file inside is followed (scored
  under its own key); a symlink to a directory is listed, not walked, and refused as a directory;
- a FIFO, socket, device or directory: refused from its `lstat`, never opened;
- a file over `max_bytes` (size from `fstat` or the S3 listing, checked again on what is read), or a
  read with no complete answer within `timeout_s`.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from workflows import storage
from workflows.ingest.source import FileTooLargeError, NotRegularFileError, SourceEscapeError, SourceTree

ARCHIVE_DATASET = "archive"  # bank namespace of raw-prefix inputs (Parquet inputs use their dataset names)
NO_CATEGORY = "_no_category"  # files at the archive root when no category is given
DEFAULT_MAX_BYTES = 128 * 2**20  # per file; see docs/operations.md ("Hostile archives")
DEFAULT_READ_TIMEOUT_S = 60.0  # per file
READ_THREADS = 8  # concurrent reads per shard (S3 latency)
READ_BUFFER_BYTES = 64 * 2**20  # bytes read ahead per shard; one larger file is read alone


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
    for item_category, key, _ in iter_archive_entries(url, category):
        yield item_category, key


def iter_archive_entries(url: str, category: str | None = None) -> Iterator[tuple[str, str, int | None]]:
    """(category, key, size from the listing or None) for every entry under `url` that is not a real
    directory: files, and also symlinks (never walked), FIFOs, devices and sockets, which `read_items`
    then refuses with a reason. Hidden names are included. Sorted, one directory at a time."""
    fs, root = storage.resolve(url)
    if not storage.with_retries(lambda: fs.isdir(root), what=f"list {url}"):
        raise FileNotFoundError(f"archive {storage.redact(url)} is not a directory or prefix")
    for entry in SourceTree(url).walk_files(hidden=True):
        key = entry.rel
        if category:
            yield category, key, entry.size
        else:
            yield (key.split("/", 1)[0] if "/" in key else NO_CATEGORY), key, entry.size


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
    sizes: list[int | None] = []

    def flush() -> ScanShard:
        shard_id = _shard_id(current, keys)  # of the keys only: a plan's shard ids do not depend on sizes
        keys_url = storage.join(plan_url, "shards", f"{shard_id}.json")
        body = {"category": current, "keys": keys}
        if any(size is not None for size in sizes):
            body["sizes"] = sizes  # object storage: sizes from the listing, checked before reading
        storage.atomic_write_json(keys_url, body)
        return ScanShard(ARCHIVE_DATASET, current, shard_id, len(keys), root_url=url, keys_url=keys_url)

    for item_category, key, size in iter_archive_entries(url, category):
        if keys and (item_category != current or len(keys) >= shard_size):
            yield flush()
            keys, sizes = [], []
        current = item_category
        keys.append(key)
        sizes.append(size)
    if keys:
        yield flush()


def shard_keys(shard: ScanShard) -> list[str]:
    return shard_entries(shard)[0]


def shard_entries(shard: ScanShard) -> tuple[list[str], list[int | None]]:
    """The shard's keys and their listed sizes (None where unknown: local trees, older plans)."""
    body = json.loads(storage.read_bytes(shard.keys_url))
    keys = list(body["keys"])
    return keys, list(body.get("sizes") or [None] * len(keys))


# ----------------------------------------------------------------------------- reading, hostile-safe
def display_key(key: str) -> str:
    """A key as stored in results: valid UTF-8 (undecodable bytes of a local file name as \\xNN)."""
    return key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str, limit: int = 500) -> str:
    return " ".join(str(text).split())[:limit]


def read_item(tree: SourceTree, key: str, *, size: int | None, max_bytes: int,
              timeout_s: float) -> tuple[bytes | None, str | None]:
    """(bytes, None) or (None, one-line reason): never raises for a bad item."""
    try:
        return tree.read(key, max_bytes=max_bytes, timeout_s=timeout_s, size=size), None
    except SourceEscapeError:
        return None, "symlink escapes the archive (not followed)"
    except NotRegularFileError as exc:
        note = " (symlinked directories are not walked)" if str(exc) == "a directory" else ""
        return None, f"not a regular file: {exc}{note}"
    except FileTooLargeError as exc:
        return None, f"file too large: {exc}"
    except FileNotFoundError:
        return None, "not found (removed since listed, or a dangling symlink)"
    except TimeoutError as exc:
        return None, f"read timed out: {exc}"
    except Exception as exc:  # noqa: BLE001 - an unreadable object is recorded, the scan goes on
        return None, one_line(storage.redact(f"unreadable: {type(exc).__name__}: {exc}"))


def read_items(root_url: str, entries: Iterable[tuple[str, int | None]], *, max_bytes: int,
               timeout_s: float) -> Iterator[tuple[str, bytes | None, str | None]]:
    """(key, bytes or None, reason or None) for each (key, listed size), in order.

    Up to `READ_THREADS` reads run ahead, holding at most `READ_BUFFER_BYTES` (by the size known before
    reading; a larger file is read alone), so a shard's memory is bounded by about
    max(READ_BUFFER_BYTES, 2 x max_bytes) plus the item the caller holds, whatever the archive holds."""
    entries = list(entries)
    try:
        tree = SourceTree(root_url)
    except Exception as exc:  # noqa: BLE001 - the archive vanished: every item is recorded, not lost
        reason = one_line(storage.redact(f"unreadable: archive root: {type(exc).__name__}: {exc}"))
        for key, _ in entries:
            yield key, None, reason
        return
    pool = ThreadPoolExecutor(READ_THREADS)
    pending: deque = deque()
    held = 0
    try:
        for key, size in entries:
            if tree.local:  # None: refused before reading (escape, not a regular file); too large: not read
                known = tree.file_size(key)
                cost = 0 if known is None or known > max_bytes else known
            else:
                cost = max_bytes if size is None else size if size <= max_bytes else 0
            while pending and (len(pending) >= READ_THREADS or held + cost > READ_BUFFER_BYTES):
                done_key, done, done_cost = pending.popleft()
                held -= done_cost
                data, error = done.result()
                del done  # its result is released with the item
                yield done_key, data, error
            future = pool.submit(read_item, tree, key, size=size, max_bytes=max_bytes, timeout_s=timeout_s)
            pending.append((key, future, cost))
            held += cost
        while pending:
            done_key, done, _ = pending.popleft()
            data, error = done.result()
            del done
            yield done_key, data, error
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
