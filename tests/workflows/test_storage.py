"""Storage URLs, atomic writes, retries and redaction; S3 against a real moto server."""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest

from tests.fixtures.s3 import FAKE_SECRET
from workflows import storage


def test_local_paths_and_file_urls_resolve_to_the_same_file(tmp_path):
    target = tmp_path / "a" / "b.bin"
    storage.atomic_write_bytes(str(target), b"hello")
    assert storage.read_bytes(f"file://{target}") == b"hello"
    assert storage.exists(str(target))
    assert storage.list_urls(str(tmp_path / "a")) == [str(target)]
    assert storage.list_urls(str(tmp_path / "missing")) == []
    with storage.open_url(str(target)) as handle:
        assert handle.read() == b"hello"


def test_unsupported_scheme_and_bad_s3_url_are_clear_errors():
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        storage.resolve("gs://bucket/x")
    with pytest.raises(ValueError, match="bad S3 URL"):
        storage.resolve("s3://")


def test_atomic_open_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError):
        with storage.atomic_open(str(target)) as handle:
            handle.write(b"partial")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "m.json"
    storage.atomic_write_json(str(target), {"a": 1})
    storage.atomic_write_json(str(target), {"a": 2})
    assert storage.read_json(str(target)) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_success_marker(tmp_path):
    assert not storage.is_committed(str(tmp_path))
    storage.mark_success(str(tmp_path), {"files": 3})
    assert storage.is_committed(str(tmp_path))


def test_redact_removes_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "verysecretvalue123")
    text = (
        "s3://AKIA:verysecretvalue123@bucket/x https://h/o?X-Amz-Signature=abcdef&X-Amz-Credential=AKIA/1 "
        "aws_secret_access_key=zzz password: hunter2 plain verysecretvalue123"
    )
    out = storage.redact(text)
    for secret in ("verysecretvalue123", "abcdef", "AKIA/1", "zzz", "hunter2"):
        assert secret not in out
    assert "bucket/x" in out


def test_retries_transient_errors_then_gives_up_with_redacted_error(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "topsecretvalue42")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("Connection reset by peer")
        return "ok"

    assert storage.with_retries(flaky, what="flaky", base_delay_s=0.001) == "ok"
    assert len(calls) == 3

    def always_throttled():
        raise OSError("SlowDown: please reduce your request rate (key topsecretvalue42)")

    with pytest.raises(storage.StorageError) as info:
        storage.with_retries(always_throttled, what="throttled", attempts=3, base_delay_s=0.001)
    assert "topsecretvalue42" not in str(info.value)

    permanent = []

    def permission_denied():
        permanent.append(1)
        raise PermissionError("denied")

    with pytest.raises(storage.StorageError):
        storage.with_retries(permission_denied, what="perm", base_delay_s=0.001)
    assert len(permanent) == 1


def test_s3_round_trip_and_settings_from_env(s3_server):
    base = s3_server.unique_url("storage")
    assert os.environ["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    storage.atomic_write_bytes(storage.join(base, "x/y.bin"), b"data")
    with storage.atomic_open(storage.join(base, "x/z.bin")) as handle:
        handle.write(b"zz")
    assert storage.read_bytes(storage.join(base, "x/y.bin")) == b"data"
    expected = [storage.join(base, "x/y.bin"), storage.join(base, "x/z.bin")]
    assert storage.list_urls(storage.join(base, "x")) == expected
    assert storage.exists(storage.join(base, "x/z.bin"))
    fs, path = storage.arrow_filesystem(storage.join(base, "x/y.bin"))
    assert isinstance(fs, pafs.S3FileSystem)
    with fs.open_input_stream(path) as stream:
        assert stream.read() == b"data"
    storage.remove(storage.join(base, "x"), recursive=True)
    assert storage.list_urls(storage.join(base, "x")) == []
    assert FAKE_SECRET not in repr(storage.S3Settings.from_env())


def test_s3_failed_atomic_open_leaves_no_object(s3_server):
    base = s3_server.unique_url("crash")
    with pytest.raises(RuntimeError):
        with storage.atomic_open(storage.join(base, "big.bin")) as handle:
            handle.write(b"x" * 1024)
            raise RuntimeError("crash")
    assert not storage.exists(storage.join(base, "big.bin"))


def test_s3_missing_object_error_is_redacted(s3_server):
    with pytest.raises((FileNotFoundError, storage.StorageError)) as info:
        storage.read_bytes(s3_server.url("no/such/object"))
    assert FAKE_SECRET not in str(info.value)


def test_errors_never_show_credentials_from_urls_or_env(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "envsecret-98765")
    with pytest.raises(ValueError) as info:
        storage.resolve("gs://user:urlsecret-123@bucket/x")
    assert "urlsecret-123" not in str(info.value)
    with pytest.raises(FileNotFoundError) as missing:
        storage.read_bytes(str(tmp_path / "envsecret-98765.bin"))
    assert "envsecret-98765" not in str(missing.value)


def test_retries_stop_at_the_deadline_which_the_environment_sets(monkeypatch):
    import time

    monkeypatch.setenv(storage.DEADLINE_ENV, "1.5")
    assert storage.storage_deadline_s() == 1.5
    calls = []

    def unreachable():
        calls.append(time.monotonic())
        raise ConnectionError("Connection refused")

    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.with_retries(unreachable, what="read s3://bucket/key", base_delay_s=0.05)
    assert time.monotonic() - started < 30  # 1.5 s here; generous for a loaded machine
    assert len(calls) >= 2  # retried within the deadline, then gave up
    assert "read s3://bucket/key: ConnectionError" in str(info.value)
    assert f"{storage.DEADLINE_ENV}=1.5" in str(info.value)
    monkeypatch.setenv(storage.DEADLINE_ENV, "soon")
    with pytest.raises(ValueError, match=storage.DEADLINE_ENV):
        storage.storage_deadline_s()


def test_request_timeouts_follow_the_deadline(monkeypatch):
    monkeypatch.setenv(storage.DEADLINE_ENV, "600")
    assert storage.request_timeouts() == (5.0, 15.0)  # s3fs's own defaults, never longer
    monkeypatch.setenv(storage.DEADLINE_ENV, "8")
    connect, read = storage.request_timeouts()
    assert connect <= 2 and read <= 2
