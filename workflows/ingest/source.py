"""A read-only view of a source tree (local directory or object-storage prefix) that refuses escapes.

Paths handed out are POSIX paths relative to the root. A symlink (local trees) or a ``..`` path
(e.g. from a CSV) that leads outside the root is reported as escaping instead of being followed.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass

from workflows import storage


class SourceEscapeError(ValueError):
    """A path leads outside the source tree."""


@dataclass(frozen=True)
class Entry:
    rel: str          # POSIX path relative to the root
    name: str
    is_dir: bool
    escapes: bool     # a symlink whose target lies outside the root


class SourceTree:
    def __init__(self, url: str) -> None:
        self.url = str(url)
        self.fs, self.root = storage.resolve(self.url)
        self.local = not storage.is_s3(self.url)
        if self.local:
            self.root = os.path.realpath(self.root)
            if not os.path.isdir(self.root):
                raise FileNotFoundError(f"source {storage.redact(self.url)} is not a directory")
        elif not self.fs.exists(self.root):
            raise FileNotFoundError(f"source {storage.redact(self.url)} does not exist")

    # -- path safety
    def normalize(self, rel: str) -> str:
        """Clean a relative path; raise ``SourceEscapeError`` if it leaves the root."""
        cleaned = posixpath.normpath(str(rel).replace("\\", "/"))
        if cleaned.startswith("/") or cleaned == ".." or cleaned.startswith("../"):
            raise SourceEscapeError(f"{rel}: path escapes the source tree")
        return "" if cleaned == "." else cleaned

    def _escapes(self, rel: str) -> bool:
        if not self.local:
            return False
        real = os.path.realpath(os.path.join(self.root, rel))
        return not (real == self.root or real.startswith(self.root + os.sep))

    def check_inside(self, rel: str) -> str:
        rel = self.normalize(rel)
        if self._escapes(rel):
            raise SourceEscapeError(f"{rel}: symlink or path escapes the source tree")
        return rel

    # -- listing and reading
    def list_dir(self, rel: str = "") -> list[Entry]:
        """Entries of a directory (hidden names skipped), sorted; missing directory -> []."""
        rel = self.normalize(rel)
        if self.local:
            path = os.path.join(self.root, rel)
            if not os.path.isdir(path):
                return []
            entries = []
            with os.scandir(path) as scan:
                for item in scan:
                    if item.name.startswith("."):
                        continue
                    child = posixpath.join(rel, item.name) if rel else item.name
                    escapes = item.is_symlink() and self._escapes(child)
                    is_dir = (not escapes) and item.is_dir(follow_symlinks=True)
                    entries.append(Entry(child, item.name, is_dir, escapes))
            return sorted(entries, key=lambda e: e.name)
        path = posixpath.join(self.root, rel) if rel else self.root
        if not self.fs.isdir(path):
            return []
        entries = []
        for info in self.fs.ls(path, detail=True):
            name = posixpath.basename(info["name"].rstrip("/"))
            if name.startswith(".") or not name:
                continue
            child = posixpath.join(rel, name) if rel else name
            entries.append(Entry(child, name, info.get("type") == "directory", False))
        return sorted(entries, key=lambda e: e.name)

    def is_dir(self, rel: str) -> bool:
        rel = self.normalize(rel)
        if self.local:
            return os.path.isdir(os.path.join(self.root, rel))
        return bool(self.fs.isdir(posixpath.join(self.root, rel)))

    def exists(self, rel: str) -> bool:
        rel = self.normalize(rel)
        if self.local:
            return os.path.exists(os.path.join(self.root, rel))
        return bool(self.fs.exists(posixpath.join(self.root, rel)))

    def read(self, rel: str) -> bytes:
        rel = self.check_inside(rel)
        if self.local:
            with open(os.path.join(self.root, rel), "rb") as handle:
                return handle.read()
        return storage.with_retries(lambda: self.fs.cat_file(posixpath.join(self.root, rel)),
                                    what=f"read {rel}")
