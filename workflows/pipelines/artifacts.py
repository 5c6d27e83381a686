"""Move directory artifacts (banks, checkpoints) between local disk and object storage, atomically."""

from __future__ import annotations

import os
import tempfile

from workflows import storage


def upload_dir(local_dir: str, url: str, marker: dict | None = None) -> None:
    """Copy every file of `local_dir` under `url`, then write the `_SUCCESS` commit marker last."""
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            with open(path, "rb") as handle:
                storage.atomic_write_bytes(storage.join(url, rel), handle.read())
    storage.mark_success(url, marker or {})


def local_dir(url: str, cache_root: str | None = None) -> str:
    """A local directory holding the committed artifact at `url` (local URLs are used in place)."""
    if not storage.is_committed(url):
        raise FileNotFoundError(f"{storage.redact(url)}: not a committed artifact (no _SUCCESS marker)")
    if not storage.is_s3(url):
        return storage.resolve(url)[1]
    target = tempfile.mkdtemp(prefix="residual-ad-", dir=cache_root)
    base = url.rstrip("/")
    for file_url in storage.list_urls(url, recursive=True):
        rel = file_url[len(base) + 1:]
        dest = os.path.join(target, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as handle:
            handle.write(storage.read_bytes(file_url))
    return target
