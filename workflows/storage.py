"""One way to turn user URLs into filesystems, with atomic writes, retries and credential redaction.

Every path a user gives is a URL: a local path, ``file://...`` or ``s3://bucket/prefix``. S3 goes
through s3fs (general I/O) or pyarrow's native ``S3FileSystem`` (Parquet scans); both honour the
standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_PROFILE`` and a custom ``AWS_ENDPOINT_URL[_S3]``).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import fsspec
from fsspec.asyn import AsyncFileSystem

from workflows import redaction

T = TypeVar("T")

SUCCESS_MARKER = "_SUCCESS"
_TRANSIENT_MARKERS = (
    "SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError",
    "503", "500 Internal", "Connection reset", "Connection aborted", "timed out", "Connection refused",
    "Could not connect", "NETWORK_CONNECTION", "Timeout",
)


class StorageError(RuntimeError):
    """A storage operation failed; the message is already redacted."""


# ----------------------------------------------------------------------------- redaction
# `redact` lives in workflows.redaction (patterns + a registry of secret literals); re-exported here
redact = redaction.redact


# ----------------------------------------------------------------------------- bounds
DEADLINE_ENV = "RESIDUAL_AD_S3_DEADLINE_S"
DEFAULT_DEADLINE_S = 60.0


def storage_deadline_s() -> float:
    """How long one storage operation may keep trying (all its retries together) before it fails with
    `StorageError`: `RESIDUAL_AD_S3_DEADLINE_S`, default 60 s. Each request inside it is bounded too
    (`request_timeouts`), so an unreachable or unresponsive S3 fails a run within about twice this."""
    raw = os.environ.get(DEADLINE_ENV, "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_DEADLINE_S
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV}={raw!r}: expected a number of seconds") from None
    return max(1.0, value)


def request_timeouts() -> tuple[float, float]:
    """(connect, read) socket timeouts of one S3 request, derived from the deadline: at most 5 s to
    connect and 15 s without a byte received (s3fs's defaults), less when the deadline is shorter."""
    deadline = storage_deadline_s()
    return min(5.0, max(1.0, deadline / 12)), min(15.0, max(2.0, deadline / 4))


ATTEMPT_ROUND_TRIPS = 2.0
"""One upload attempt may last this many (connect + read) timeouts before it is cut and retried."""
MIN_UPLOAD_BYTES_PER_S = 2**20
"""Slowest upload rate still worth waiting for: each attempt (and the deadline) gets the payload's
size at this rate on top (`with_retries(payload_bytes=...)`)."""


def upload_attempt_s(nbytes: int) -> float:
    """Hard bound of one upload attempt of `nbytes`: 40 s plus 1 s per MiB with the default deadline.

    The socket timeouts alone do not bound an upload: aiohttp arms its read timeout only once the
    body is sent, and a PUT whose `Expect: 100-continue` preamble meets a connection the server has
    just reset waits for an answer forever (seen in `tests/faults`, s3fs 2026.9, aiohttp 3.14). A hung
    attempt is cut here and retried like any other transient error."""
    connect_s, read_s = request_timeouts()
    return ATTEMPT_ROUND_TRIPS * (connect_s + read_s) + nbytes / MIN_UPLOAD_BYTES_PER_S


# ----------------------------------------------------------------------------- retries
def is_transient(exc: BaseException) -> bool:
    """Whether an error is worth retrying (throttling, 5xx, dropped connections, timeouts)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    if name in {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "FSTimeoutError",
                "ConnectionClosedError", "ServerDisconnectedError", "ClientOSError"}:
        return True
    message = str(exc)
    return any(marker in message for marker in _TRANSIENT_MARKERS)


_local = threading.local()


def _remaining_s() -> float | None:
    """Seconds left of the innermost running `with_retries` deadline (None outside one)."""
    deadline = getattr(_local, "deadline", None)
    return None if deadline is None else max(0.5, deadline - time.monotonic())


def _bounded(fs: fsspec.AbstractFileSystem, method: str, *args, attempt_s: float | None = None, **kwargs):
    """Call `fs.method(*args, **kwargs)`; on an async filesystem (s3fs) with a hard timeout of what is
    left of the current deadline, so no single call can outlive it, and of `attempt_s` when given (a
    hung attempt then fails as `FSTimeoutError`, which `with_retries` retries)."""
    remaining = _remaining_s()
    if remaining is not None and isinstance(fs, AsyncFileSystem) and not fs.asynchronous:
        kwargs["timeout"] = remaining if attempt_s is None else min(remaining, attempt_s)
    return getattr(fs, method)(*args, **kwargs)


MAX_BACKOFF_S = 4.0


def with_retries(fn: Callable[[], T], *, what: str, attempts: int | None = None, base_delay_s: float = 0.25,
                 payload_bytes: int = 0) -> T:
    """Call `fn` and retry transient errors with exponential backoff (capped at `MAX_BACKOFF_S`) until
    the deadline (`RESIDUAL_AD_S3_DEADLINE_S`, plus `payload_bytes` at `MIN_UPLOAD_BYTES_PER_S` for an
    upload, so a large object is not cut by a deadline sized for small ones) or `attempts` (default:
    no count limit) run out: an outage shorter than the deadline is carried through, a longer one
    fails. No retry starts after the deadline, and s3fs calls made through `_bounded` inside `fn` are
    cut at it.

    Non-transient errors and the last transient one are raised as `StorageError` with a redacted
    message naming `what` (`FileNotFoundError` passes through unchanged but redacted)."""
    bound_s = storage_deadline_s()
    transfer_s = payload_bytes / MIN_UPLOAD_BYTES_PER_S
    started = time.monotonic()
    deadline = started + bound_s + transfer_s
    outer = getattr(_local, "deadline", None)
    _local.deadline = deadline if outer is None else min(outer, deadline)
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                return fn()
            except FileNotFoundError as exc:
                raise FileNotFoundError(redact(f"{what}: not found ({exc})")) from None
            except Exception as exc:  # noqa: BLE001 - classified below
                delay = min(MAX_BACKOFF_S, base_delay_s * 2 ** (attempt - 1))
                transient = is_transient(exc)
                more = attempts is None or attempt < attempts
                if transient and more and time.monotonic() + delay < _local.deadline:
                    time.sleep(delay)
                    continue
                detail = f"{type(exc).__name__}: {str(exc).strip() or 'no answer in time'}"
                if transient:
                    elapsed = time.monotonic() - started
                    allowance = f" + {transfer_s:.0f}s for {payload_bytes} bytes" if transfer_s >= 1 else ""
                    detail += (f" (gave up after {attempt} attempt(s) in {elapsed:.0f}s; "
                               f"bound {DEADLINE_ENV}={bound_s:g}{allowance})")
                raise StorageError(redact(f"{what}: {detail}")) from None
    finally:
        _local.deadline = outer


# ----------------------------------------------------------------------------- URL resolution
@dataclass(frozen=True)
class S3Settings:
    """S3 connection settings read from the standard AWS environment (never logged)."""

    endpoint_url: str | None
    region: str | None
    key: str | None
    secret: str | None
    token: str | None
    profile: str | None

    @classmethod
    def from_env(cls) -> S3Settings:
        env = os.environ
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
            key=env.get("AWS_ACCESS_KEY_ID") or None,
            secret=env.get("AWS_SECRET_ACCESS_KEY") or None,
            token=env.get("AWS_SESSION_TOKEN") or None,
            profile=env.get("AWS_PROFILE") or None,
        )

    def __repr__(self) -> str:  # keep secrets out of reprs, logs and tracebacks
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, key=***)"


def is_s3(url: str) -> bool:
    return str(url).startswith(("s3://", "s3a://"))


_S3FS_CACHE: dict[tuple, fsspec.AbstractFileSystem] = {}


def clear_cache() -> None:
    """Forget cached S3 filesystem clients (tests call this when the AWS environment changes)."""
    _S3FS_CACHE.clear()


def _s3fs(settings: S3Settings) -> fsspec.AbstractFileSystem:
    """One s3fs client per process and settings (client creation is slow); keyed by the full settings
    so a changed environment gets a new client, and by pid so a forked child never reuses its parent's
    event loop. Listings are never cached."""
    key = (os.getpid(), settings, request_timeouts())
    if key not in _S3FS_CACHE:
        _S3FS_CACHE[key] = _new_s3fs(settings)
    return _S3FS_CACHE[key]


def _new_s3fs(settings: S3Settings) -> fsspec.AbstractFileSystem:
    import s3fs

    client_kwargs: dict[str, Any] = {}
    if settings.region:
        client_kwargs["region_name"] = settings.region
    connect_s, read_s = request_timeouts()
    kwargs: dict[str, Any] = {
        "endpoint_url": settings.endpoint_url,
        "client_kwargs": client_kwargs,
        # listings are not cached: pyarrow and other processes write the same prefixes
        "use_listings_cache": False,
        "skip_instance_cache": True,
        # every request bounded: botocore's socket timeouts and 2 attempts; `with_retries` (deadline)
        # does the retrying across an outage
        "config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"},
                          "connect_timeout": connect_s, "read_timeout": read_s},
    }
    if settings.key and settings.secret:
        kwargs.update(key=settings.key, secret=settings.secret, token=settings.token)
    elif settings.profile:
        kwargs["profile"] = settings.profile
    fs = s3fs.S3FileSystem(**kwargs)
    fs.retries = 2  # s3fs's own retry loop (default 5) multiplies botocore's; keep it short
    return fs


def _reject_userinfo(url: str) -> None:
    """Credentials in an S3 URL are not supported (and would reach botocore's messages as part of the
    bucket name): fail before any client sees the URL, with the credentials redacted."""
    netloc = url.split("://", 1)[1].split("/", 1)[0] if "://" in url else ""
    if "@" in netloc or ":" in netloc:  # bucket names hold neither; `user:pass/word@b` cuts at '/'
        redaction.register_urls_in(url)
        raise ValueError(f"{redact(url)}: credentials in S3 URLs are not supported; give them through the "
                         "AWS environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an "
                         "instance or pod identity)")


def resolve(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL -> (fsspec filesystem, path inside it). Local paths become absolute."""
    url = str(url)
    if not url:
        raise ValueError("empty storage URL")
    if is_s3(url):
        _reject_userinfo(url)
        path = url.split("://", 1)[1].rstrip("/")
        if not path or path.startswith("/"):
            raise ValueError(f"bad S3 URL {redact(url)!r}: expected s3://bucket/prefix")
        return _s3fs(S3Settings.from_env()), path
    if url.startswith("file://"):
        url = url[len("file://"):]
    elif "://" in url:
        raise ValueError(f"unsupported URL scheme in {redact(url)!r}: use a local path, file:// or s3://")
    return fsspec.filesystem("file"), os.path.abspath(os.path.expanduser(url))


def absolute(url: str) -> str:
    """The same location as a URL that means the same from any process: local paths become absolute
    (Ray workers on another node or in another working directory resolve it alike); S3 URLs are kept."""
    url = str(url)
    if is_s3(url) or "://" in url and not url.startswith("file://"):
        return url
    return resolve(url)[1]


def join(url: str, *parts: str) -> str:
    """Join URL path segments with '/' (works for local paths and s3://)."""
    out = str(url).rstrip("/")
    for part in parts:
        out = f"{out}/{str(part).strip('/')}"
    return out


def arrow_filesystem(url: str):
    """URL -> (pyarrow.fs.FileSystem, path) for Parquet scans; native S3 with the same settings."""
    import pyarrow.fs as pafs

    if not is_s3(url):
        _, path = resolve(url)
        return pafs.LocalFileSystem(), path
    _reject_userinfo(url)
    settings = S3Settings.from_env()
    connect_s, read_s = request_timeouts()
    kwargs: dict[str, Any] = {"connect_timeout": connect_s, "request_timeout": read_s}
    if settings.endpoint_url:
        kwargs["endpoint_override"] = settings.endpoint_url
        if settings.endpoint_url.startswith("http://"):
            kwargs["scheme"] = "http"
    path = url.split("://", 1)[1].rstrip("/")
    if settings.region:
        kwargs["region"] = settings.region
    elif not settings.endpoint_url:  # real AWS without a configured region: ask the bucket
        try:
            kwargs["region"] = pafs.resolve_s3_region(path.split("/", 1)[0])
        except Exception:  # noqa: BLE001 - fall back to the SDK's default region
            pass
    if settings.key and settings.secret:
        kwargs.update(access_key=settings.key, secret_key=settings.secret, session_token=settings.token)
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=2)  # `with_retries` retries
    return pafs.S3FileSystem(**kwargs), path


# ----------------------------------------------------------------------------- basic operations
def open_url(url: str, mode: str = "rb") -> IO[bytes]:
    """Open a URL as a file object (the ``opener`` handed to residual_core)."""
    fs, path = resolve(url)
    return with_retries(lambda: fs.open(path, mode), what=f"open {url}")


def read_bytes(url: str) -> bytes:
    fs, path = resolve(url)
    return with_retries(lambda: _bounded(fs, "cat_file", path), what=f"read {url}")


def exists(url: str) -> bool:
    fs, path = resolve(url)
    return bool(with_retries(lambda: _bounded(fs, "exists", path), what=f"exists {url}"))


def list_urls(url: str, *, recursive: bool = False) -> list[str]:
    """URLs of the entries under ``url`` (files only when recursive). Missing -> empty list."""
    fs, path = resolve(url)

    def _list() -> list[str]:
        if not _bounded(fs, "exists", path):
            return []
        return sorted(_bounded(fs, "find", path) if recursive else _bounded(fs, "ls", path, detail=False))

    found = with_retries(_list, what=f"list {url}")
    return [_to_url(url, path, p) for p in found]


def _to_url(base_url: str, base_path: str, path: str) -> str:
    rel = path[len(base_path):].lstrip("/") if path.startswith(base_path) else path
    return join(base_url, rel) if rel else base_url


def remove(url: str, *, recursive: bool = False, missing_ok: bool = True) -> None:
    fs, path = resolve(url)

    def _rm() -> None:
        if missing_ok and not _bounded(fs, "exists", path):
            return
        _bounded(fs, "rm", path, recursive=recursive)

    with_retries(_rm, what=f"remove {url}")


def makedirs(url: str) -> None:
    fs, path = resolve(url)
    if not is_s3(url):
        fs.makedirs(path, exist_ok=True)


# ----------------------------------------------------------------------------- atomic writes
def temp_sibling(url: str) -> str:
    """A hidden temporary name beside ``url`` (same directory, so a rename stays on one volume)."""
    head, _, name = str(url).rstrip("/").rpartition("/")
    hidden = f".{name}.{uuid.uuid4().hex[:12]}.tmp"  # hidden and not matching *.parquet / *.json globs
    return f"{head}/{hidden}" if head else hidden


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write ``data`` so readers see either the old object or the whole new one.

    Local: write a temporary sibling, fsync, ``os.replace``. S3: a single PUT, which S3 commits
    atomically (a failed upload leaves nothing visible)."""
    fs, path = resolve(url)
    if is_s3(url):
        with_retries(lambda: _bounded(fs, "pipe_file", path, data, attempt_s=upload_attempt_s(len(data))),
                     what=f"write {url}", payload_bytes=len(data))
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(url: str, payload: Any) -> None:
    atomic_write_bytes(url, (json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


@contextmanager
def atomic_open(url: str) -> Iterator[IO[bytes]]:
    """Context manager that writes a file under a temporary name and commits it on clean exit.

    For S3 the multipart upload only becomes visible when the file is closed successfully; an
    exception aborts it. Locally the temporary file is renamed into place, or removed on error."""
    fs, path = resolve(url)
    if is_s3(url):
        handle = with_retries(lambda: fs.open(path, "wb"), what=f"open {url} for writing")
        try:
            yield handle
        except BaseException:
            discard = getattr(handle, "discard", None)
            if discard is not None:
                discard()  # aborts the multipart upload: nothing becomes visible
            handle.closed = True  # keep fsspec's __del__ from trying to upload the remains
            raise
        with_retries(handle.close, what=f"commit {url}", attempts=1)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def mark_success(dir_url: str, payload: dict | None = None) -> None:
    """Write the ``_SUCCESS`` commit marker of a directory (index, result, ...); write it last."""
    atomic_write_json(join(dir_url, SUCCESS_MARKER), payload or {})


def is_committed(dir_url: str) -> bool:
    """Whether a directory output was completely written (its commit marker exists)."""
    return exists(join(dir_url, SUCCESS_MARKER))
