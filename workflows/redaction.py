"""Credential redaction for every message that leaves the process.

Two complementary mechanisms, both behind `redact(text)` (re-exported as `workflows.storage.redact`):

- patterns: URL userinfo (`scheme://user:password@host`, whatever the password holds: `/`, `@`, `:` or
  percent-encoded bytes), signed-URL parameters and `key=value` secrets;
- literals: a process-wide registry of secret values that are replaced wherever they appear, also
  outside any URL (botocore's `Invalid bucket name "user:secret@bucket"` has no scheme). It holds the
  values of the secret environment variables (`SECRET_ENV_VARS`, read at each call), the passwords of
  the URLs in `URL_ENV_VARS` (e.g. an authenticated `MLFLOW_TRACKING_URI`), and whatever
  `register_secret` / `register_urls_in` were given (the CLI registers the password of every URL in its
  arguments and config file). Each value is registered raw, percent-decoded, percent-encoded and as the
  base64 of `user:password` (a Basic authorization header).

`install()` routes `sys.stdout` / `sys.stderr` through `RedactingStream` and redacts every logging
record (`logging.setLogRecordFactory`), so prints, warnings, tracebacks and log lines are redacted.
Ray workers get the same through `install_in_worker` (a `worker_process_setup_hook`, see
`workflows.pipelines.ray_runtime.init_ray`); the registered literals travel to them base64-encoded in
the environment variable `TRANSPORT_ENV` (so the literal never appears in Ray's job table or logs).

Values shorter than `MIN_SECRET_CHARS` are not replaced as literals (they would mangle ordinary text);
the URL patterns still remove them from URLs.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

MIN_SECRET_CHARS = 4
MASK = "***"
TRANSPORT_ENV = "RESIDUAL_AD_REDACT"
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECURITY_TOKEN",
    "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_AND_KEY",
    "MINIO_ROOT_PASSWORD", "AZURE_STORAGE_KEY", "GOOGLE_API_KEY",
)
URL_ENV_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                "MLFLOW_S3_ENDPOINT_URL", "RAY_ADDRESS", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                "https_proxy")

# scheme://USERINFO@ : a user (no '/', '@' or whitespace) with ':' and a password that may hold anything
# but whitespace and quotes (up to the last '@' of the token), or a bare token (`https://TOKEN@host`)
_USERINFO = re.compile(
    r"(?i)\b([a-z][a-z0-9+.\-]*://)((?:[^\s/@'\"<>:]*:[^\s'\"<>]*)|(?:[^\s/@:'\"<>]+))@")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (_USERINFO, rf"\1{MASK}@"),
    (re.compile(r"(?i)(X-Amz-(?:Signature|Credential|Security-Token)=)[^&\s'\"]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)((?:aws_)?(?:secret_access_key|secret_key|session_token|access_key_id|access_key"
                r"|password|passwd|secret|token)['\"]?\s*[:=]\s*['\"]?)[^'\"\s,&}]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)(Signature=)[^&\s'\"]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)(Credential=)[^,&\s'\"]+"), rf"\1{MASK}"),
    (re.compile(r"(?i)(Authorization['\"]?\s*[:=]\s*['\"]?(?:Basic|Bearer|AWS4-HMAC-SHA256)\s+)[^'\"\s,}]+"),
     rf"\1{MASK}"),
)

_registry: set[str] = set()
_lock = threading.Lock()
_version = [0]  # bumped on every change of the registry (the literal list is cached per version)


# ----------------------------------------------------------------------------- the registry
def _forms(value: str) -> set[str]:
    """The spellings a secret can take in a message: raw, percent-decoded, percent-encoded."""
    forms = {value}
    for decoded in (unquote(value), unquote_plus(value)):
        forms.add(decoded)
    for base in list(forms):
        forms.add(quote(base, safe=""))
        forms.add(quote(base, safe="/:"))  # urllib's default keeps '/', some clients keep ':'
    return {f for f in forms if len(f) >= MIN_SECRET_CHARS}


def _userinfo_secrets(userinfo: str) -> set[str]:
    """Secrets of one URL userinfo: the password (`user:password`) or the bare token, plus the base64
    of `user:password` (how it travels in a Basic authorization header)."""
    if ":" in userinfo:
        user, password = userinfo.split(":", 1)
        found = set(_forms(password)) if password else set()
        for pair in {userinfo, f"{unquote(user)}:{unquote(password)}"}:
            if password:
                found.add(base64.b64encode(pair.encode()).decode())
        return found
    return set(_forms(userinfo))


def url_secrets(text: Any) -> set[str]:
    """The secret parts of every URL with userinfo in `text` (without registering them)."""
    found: set[str] = set()
    for match in _USERINFO.finditer(str(text)):
        found |= _userinfo_secrets(match.group(2))
    return found


def register_secret(value: Any) -> None:
    """Redact `value` (and its percent-encoded / decoded forms) from now on, in this process and in the
    Ray workers started afterwards."""
    if value is None:
        return
    forms = _forms(str(value))
    if forms - _registry:
        _add(forms)


def register_urls_in(*texts: Any) -> None:
    """Register the password of every URL with credentials found in `texts` (strings, lists, dicts)."""
    for text in _strings(texts):
        found = url_secrets(text)
        if found - _registry:
            _add(found)


def _add(values: Iterable[str]) -> None:
    with _lock:
        _registry.update(values)
        _version[0] += 1


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, (list, tuple, set)):
        for item in value:
            yield from _strings(item)


def _env_secrets() -> set[str]:
    env = os.environ
    found: set[str] = set()
    for name in SECRET_ENV_VARS:
        value = env.get(name)
        if value:
            found |= _forms(value)
    for name in URL_ENV_VARS:
        value = env.get(name)
        if value and "@" in value:
            found |= url_secrets(value)
    return found


_cache: tuple[Any, list[str]] = (None, [])


def secrets() -> list[str]:
    """Every literal `redact` replaces, longest first (so a secret containing another goes whole)."""
    global _cache
    key = (_version[0], *(os.environ.get(n) for n in (*SECRET_ENV_VARS, *URL_ENV_VARS)))
    cached_key, value = _cache
    if cached_key != key:
        value = sorted(_registry | _env_secrets(), key=len, reverse=True)
        _cache = (key, value)
    return value


def redact(text: Any) -> str:
    """`str(text)` with credentials removed: registered and environment secrets (any spelling), URL
    userinfo, signed-URL parameters and `key=value` secrets."""
    out = str(text)
    for value in secrets():
        if value in out:
            out = out.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out


# ----------------------------------------------------------------------------- transport to workers
def transport_value() -> str:
    """The registered literals, base64-encoded JSON, for `TRANSPORT_ENV` in a worker's environment."""
    return base64.b64encode(json.dumps(sorted(_registry)).encode()).decode()


def load_transported(value: str | None = None) -> None:
    """Register the literals a parent process put in `TRANSPORT_ENV`."""
    value = os.environ.get(TRANSPORT_ENV) if value is None else value
    if not value:
        return
    try:
        loaded = json.loads(base64.b64decode(value.encode()).decode())
    except (binascii.Error, ValueError):
        return
    _add(str(v) for v in loaded if len(str(v)) >= MIN_SECRET_CHARS)


def export_to_environ() -> None:
    """Put the registered literals in this process's environment (children started later inherit it)."""
    if _registry:
        os.environ[TRANSPORT_ENV] = transport_value()


# ----------------------------------------------------------------------------- streams and logging
class RedactingStream(io.TextIOBase):
    """A text stream that redacts whole lines before passing them on (a secret is never split across
    two writes of one line); a partial line goes out on `flush()` (progress bars end lines with
    carriage returns, which also end a line here)."""

    def __init__(self, target) -> None:
        super().__init__()
        self._target = target
        self._pending = ""
        self._lock = threading.RLock()

    @property
    def target(self):
        return self._target

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            text = str(text)
        with self._lock:
            self._pending += text
            cut = max(self._pending.rfind("\n"), self._pending.rfind("\r"))
            if cut >= 0:
                ready, self._pending = self._pending[:cut + 1], self._pending[cut + 1:]
                self._target.write(redact(ready))
            if len(self._pending) > 1 << 16:  # a very long line: pass it on in pieces
                ready, self._pending = self._pending, ""
                self._target.write(redact(ready))
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                ready, self._pending = self._pending, ""
                self._target.write(redact(ready))
            try:
                self._target.flush()
            except (OSError, ValueError):
                pass

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        try:
            return bool(self._target.isatty())
        except (AttributeError, OSError, ValueError):
            return False

    def fileno(self) -> int:  # faulthandler and subprocess need a descriptor
        return self._target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self._target, "errors", None)

    def close(self) -> None:  # never close the real stream under the interpreter's feet
        self.flush()


def _redacting_record_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args, **kwargs) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            record.msg = redact(record.getMessage())
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            if record.stack_info:
                record.stack_info = redact(record.stack_info)
        except Exception:  # noqa: BLE001 - a logging record must never raise; mask it whole instead
            record.msg, record.args = "<log record withheld: it could not be redacted>", None
        return record

    factory._residual_ad_redacting = True  # type: ignore[attr-defined]
    return factory


class _Installed:
    def __init__(self) -> None:
        self.stdout = sys.stdout
        self.stderr = sys.stderr
        self.factory = logging.getLogRecordFactory()
        self.handlers: list[tuple[logging.StreamHandler, Any]] = []


def _retarget_handlers(mapping: dict[int, Any], state: _Installed | None) -> None:
    """Point logging handlers that write to the old stdout/stderr at the redacting streams (Ray, tqdm and
    others create their handlers at import time, holding the stream object of that moment)."""
    loggers = [logging.getLogger(), *list(logging.root.manager.loggerDict.values())]
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", None) or []):
            if isinstance(handler, logging.StreamHandler) and id(handler.stream) in mapping:
                old = handler.stream
                handler.stream = mapping[id(old)]
                if state is not None:
                    state.handlers.append((handler, old))


def install() -> Callable[[], None]:
    """Redact this process's stdout, stderr and logging; returns a function that undoes it."""
    load_transported()
    state = _Installed()
    if not getattr(logging.getLogRecordFactory(), "_residual_ad_redacting", False):
        logging.setLogRecordFactory(_redacting_record_factory(state.factory))
    mapping: dict[int, Any] = {}
    for name in ("stdout", "stderr"):
        current = getattr(sys, name)
        if current is not None and not isinstance(current, RedactingStream):
            wrapped = RedactingStream(current)
            setattr(sys, name, wrapped)
            mapping[id(current)] = wrapped
    _retarget_handlers(mapping, state)

    def undo() -> None:
        for name in ("stdout", "stderr"):
            current = getattr(sys, name)
            if isinstance(current, RedactingStream):
                current.flush()
        sys.stdout, sys.stderr = state.stdout, state.stderr
        for handler, old in state.handlers:
            handler.stream = old
        logging.setLogRecordFactory(state.factory)

    return undo


def install_in_worker() -> None:
    """`worker_process_setup_hook` of Ray workers: the transported secrets, redacted streams and logs."""
    install()
