"""A read-only view of a source tree (local directory or object-storage prefix) that refuses escapes.

Paths handed out are POSIX paths relative to the root. A symlink (local trees) or a ``..`` path
(e.g. from a CSV) that leads outside the root is reported as escaping instead of being followed.

Reading treats the tree as hostile (`read`): the escape check (on the resolved path) comes before
anything is opened, so the target of an escaping link is never opened; only regular files are
read (a FIFO, device, socket or directory is refused from its ``lstat``, never opened); the file is
opened component by component from the root with ``O_NOFOLLOW``, so a path swapped for a symlink
after the check is refused too; ``max_bytes`` bounds what is read and ``timeout_s`` how long (local:
checked between 1 MiB chunks, which does not interrupt one read() stuck in the kernel; S3: the
request is cancelled).
"""

from __future__ import annotations

import errno
import os
import posixpath
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass

from workflows import storage

READ_CHUNK = 1 << 20  # local reads: bytes per read() call; the timeout is checked between chunks


class SourceEscapeError(ValueError):
    """A path leads outside the source tree."""


class NotRegularFileError(OSError):
    """The path is not a regular file (FIFO, device, socket, directory, unresolvable link): not read."""


class FileTooLargeError(OSError):
    """The file is larger than the read limit (`max_bytes`); refused before or while reading."""


@dataclass(frozen=True)
class Entry:
    rel: str          # POSIX path relative to the root
    name: str
    is_dir: bool      # a directory, or (local) a symlink to a directory inside the root
    escapes: bool     # a symlink whose target lies outside the root
    link: bool = False        # a symlink (local trees)
    size: int | None = None   # object size from the listing (object storage; None for local trees)


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
    def list_dir(self, rel: str = "", *, hidden: bool = False) -> list[Entry]:
        """Entries of a directory (hidden names skipped unless `hidden`), sorted; missing directory -> []."""
        rel = self.normalize(rel)
        if self.local:
            path = os.path.join(self.root, rel)
            if not os.path.isdir(path):
                return []
            entries = []
            with os.scandir(path) as scan:
                for item in scan:
                    if item.name.startswith(".") and not hidden:
                        continue
                    child = posixpath.join(rel, item.name) if rel else item.name
                    link = item.is_symlink()
                    escapes = link and self._escapes(child)
                    entries.append(Entry(child, item.name, (not escapes) and _is_dir(item), escapes, link))
            return sorted(entries, key=lambda e: e.name)
        path = posixpath.join(self.root, rel) if rel else self.root
        if not storage.with_retries(lambda: self.fs.isdir(path), what=f"list {rel or '.'}"):
            return []
        entries = []
        for info in storage.with_retries(lambda: self.fs.ls(path, detail=True), what=f"list {rel or '.'}"):
            name = posixpath.basename(info["name"].rstrip("/"))
            if not name or (name.startswith(".") and not hidden):
                continue
            child = posixpath.join(rel, name) if rel else name
            is_dir = info.get("type") == "directory"
            size = None if is_dir or info.get("size") is None else int(info["size"])
            entries.append(Entry(child, name, is_dir, False, size=size))
        return sorted(entries, key=lambda e: e.name)

    def walk_files(self, rel: str = "", *, hidden: bool = True) -> Iterator[Entry]:
        """Every entry under `rel` that is not walked into, directory by directory in sorted order (a
        directory's own entries before its subdirectories, as ``fsspec``'s walk). Only real directories
        are walked: a symlink is yielded as an entry, never walked, whether it points to a directory
        inside the root or outside (no loops, no escapes, nothing listed twice)."""
        stack = [self.normalize(rel)]
        while stack:
            subdirs = []
            for entry in self.list_dir(stack.pop(), hidden=hidden):
                if entry.is_dir and not entry.link and not entry.escapes:
                    subdirs.append(entry.rel)
                else:
                    yield entry
            stack.extend(reversed(subdirs))

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

    def read(self, rel: str, *, max_bytes: int | None = None, timeout_s: float | None = None,
             size: int | None = None) -> bytes:
        """The bytes of a regular file inside the tree (see the module doc for the refusals).

        `max_bytes`: a larger file raises ``FileTooLargeError`` (checked on the size before reading,
        and on what was read); `timeout_s`: no complete answer in time raises ``TimeoutError``;
        `size`: the object size from the listing (object storage: saves a HEAD request)."""
        rel = self.check_inside(rel)
        if self.local:
            return self._read_local(rel, max_bytes, timeout_s)
        path = posixpath.join(self.root, rel)
        if max_bytes is None and timeout_s is None:
            return storage.with_retries(lambda: self.fs.cat_file(path), what=f"read {rel}")
        if size is None:
            size = int(storage.with_retries(lambda: self.fs.size(path), what=f"size of {rel}"))
        if max_bytes is not None and size > max_bytes:
            raise FileTooLargeError(f"{size} bytes > max_bytes={max_bytes}")
        if size == 0:
            return b""  # a ranged GET of an empty object is an error (416)
        limits = {"start": 0, "end": max_bytes + 1} if max_bytes is not None else {}
        timed_out = object()

        def cat():
            from fsspec.exceptions import FSTimeoutError

            try:
                return self.fs.cat_file(path, timeout=timeout_s, **limits)
            except FSTimeoutError:
                return timed_out  # not retried: the timeout bounds the whole read

        data = storage.with_retries(cat, what=f"read {rel}")
        if data is timed_out:
            raise TimeoutError(f"no complete answer within {timeout_s:g} s")
        if max_bytes is not None and len(data) > max_bytes:
            raise FileTooLargeError(f"more than max_bytes={max_bytes} bytes")
        return data

    def file_size(self, rel: str) -> int | None:
        """Local trees: the size of a regular file inside the tree (None for anything `read` refuses
        before reading); object storage: None (the listing has it)."""
        if not self.local:
            return None
        try:
            real = self._real(self.check_inside(rel))
            info = os.lstat(real)
        except (SourceEscapeError, OSError):
            return None
        return info.st_size if stat.S_ISREG(info.st_mode) else None

    # -- local reading, hostile-tree safe
    def _real(self, rel: str) -> str:
        """The resolved path of `rel` (links inside the tree followed), known to be inside the root."""
        real = os.path.realpath(os.path.join(self.root, rel))
        if not (real == self.root or real.startswith(self.root + os.sep)):
            raise SourceEscapeError(f"{rel}: symlink or path escapes the source tree")
        return real

    def _open_local(self, rel: str) -> int:
        real = self._real(rel)
        info = os.lstat(real)  # the resolved path: no symlink left unless it is a loop
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(_kind(info.st_mode))
        parts = os.path.relpath(real, self.root).split(os.sep)
        nofollow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        dir_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, nofollow | os.O_DIRECTORY, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            fd = os.open(parts[-1], nofollow | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):  # a component became a symlink since the check
                raise SourceEscapeError(f"{rel}: path changed into a symlink while being read") from None
            raise
        finally:
            os.close(dir_fd)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):  # swapped after the lstat: opened non-blocking, closed unread
            os.close(fd)
            raise NotRegularFileError(_kind(mode))
        return fd

    def _read_local(self, rel: str, max_bytes: int | None, timeout_s: float | None) -> bytes:
        fd = self._open_local(rel)
        try:
            declared = os.fstat(fd).st_size
            if max_bytes is not None and declared > max_bytes:
                raise FileTooLargeError(f"{declared} bytes > max_bytes={max_bytes}")
            deadline = time.monotonic() + timeout_s if timeout_s else None
            limit = None if max_bytes is None else max_bytes + 1
            chunks, total = [], 0
            while limit is None or total < limit:
                chunk = os.read(fd, READ_CHUNK if limit is None else min(READ_CHUNK, limit - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"not read within {timeout_s:g} s ({total} bytes so far)")
            if limit is not None and total >= limit:
                raise FileTooLargeError(f"more than max_bytes={max_bytes} bytes (the file grew while read)")
            return b"".join(chunks)
        finally:
            os.close(fd)


def _is_dir(item: os.DirEntry) -> bool:
    try:
        return item.is_dir(follow_symlinks=True)
    except OSError:  # a symlink loop (ELOOP) and the like: not a directory; reading it is refused
        return False


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink that does not resolve")):
        if test(mode):
            return name
    return f"mode {oct(mode)}"
