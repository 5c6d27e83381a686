"""Credential redaction: URL patterns whatever the password holds, the registry of secret literals, the
redacting streams and log records, and the CLI's one-line errors."""

from __future__ import annotations

import base64
import io
import logging
import sys

import pytest

from workflows import redaction, storage


@pytest.mark.parametrize("password", ["hunter2x", "Sl/AsH", "p@ss:w/rd", "p%40ss%2Fw0rd", "abc/d@e"])
def test_url_userinfo_is_removed_whatever_the_password_holds(password):
    for scheme in ("s3", "http", "https", "postgresql+psycopg"):
        text = f"failed: {scheme}://user:{password}@host.example:5000/path/key.bin (retry)"
        out = redaction.redact(text)
        assert password not in out and f"{scheme}://***@host.example:5000/path/key.bin (retry)" in out
    assert redaction.redact("https://ghp_tokenvalue1234@github.com/x") == "https://***@github.com/x"


def test_no_over_redaction_of_ordinary_urls_and_specs():
    for text in ("s3://bucket/file@2x.png", "openclip:ViT-B-16@/ckpt.pt", "s3://bucket/dir/a:b/c",
                 "http://127.0.0.1:5000/api/2.0/mlflow/runs/get?run_id=1", "effnet-lite0 at 224 px"):
        assert redaction.redact(text) == text


def test_registered_secrets_are_replaced_anywhere_in_every_spelling():
    redaction.register_urls_in(["--set=data.url=s3://user:Reg/Secret@9q@bucket/x"])
    message = 'Invalid bucket name "user:Reg/Secret@9q@bucket": Reg%2FSecret%409q and Reg/Secret@9q'
    out = redaction.redact(message)
    assert "Reg/Secret@9q" not in out and "Reg%2FSecret%409q" not in out
    basic = base64.b64encode(b"user:Reg/Secret@9q").decode()
    assert basic not in redaction.redact(f"Authorization: Basic {basic}")
    assert basic not in redaction.redact(basic)
    redaction.register_secret("literal-Zk42")
    assert redaction.redact("a literal-Zk42 b") == "a *** b"
    redaction.register_secret("ab")  # too short to replace as a literal: it would mangle ordinary text
    assert redaction.redact("tab stab") == "tab stab"


def test_environment_secrets_and_authenticated_tracking_uri(monkeypatch):
    monkeypatch.setenv("AWS_SESSION_TOKEN", "sessiontoken-Vb81")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://me:Ml%2Fflow-77@mlflow.internal:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "bearer-tok-3x")
    out = redaction.redact("sessiontoken-Vb81 Ml/flow-77 Ml%2Fflow-77 bearer-tok-3x host=mlflow.internal")
    assert out == "*** *** *** *** host=mlflow.internal"


def test_secrets_travel_to_workers_encoded():
    redaction.register_secret("travelling-Qw9")
    value = redaction.transport_value()
    assert "travelling-Qw9" not in value
    redaction._registry.discard("travelling-Qw9")  # as in a fresh worker process
    redaction._version[0] += 1
    assert "travelling-Qw9" in redaction.redact("travelling-Qw9")
    redaction.load_transported(value)
    assert redaction.redact("x travelling-Qw9") == "x ***"


def test_redacting_stream_never_splits_a_secret_within_a_line():
    redaction.register_secret("split-secret-77")
    target = io.StringIO()
    stream = redaction.RedactingStream(target)
    stream.write("url s3://u:split-")
    stream.write("secret-77@b/x and split-sec")
    assert target.getvalue() == ""  # no line end yet: nothing passed on
    stream.write("ret-77\nprogress 10%\r")
    assert target.getvalue() == "url s3://***@b/x and ***\nprogress 10%\r"
    stream.write("tail split-secret-77")
    stream.flush()
    assert target.getvalue().endswith("tail ***")


def test_install_redacts_streams_and_log_records_then_undoes(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-Lm55")
    buffer = io.StringIO()
    logger = logging.getLogger("residual-ad-redaction-test")
    handler = logging.StreamHandler(buffer)
    logger.addHandler(handler)
    before = sys.stdout
    undo = redaction.install()
    try:
        assert isinstance(sys.stdout, redaction.RedactingStream)
        logger.warning("key %s in %s", "aws-secret-Lm55", "s3://k:aws-secret-Lm55@b/x")
        try:
            raise ValueError("boom aws-secret-Lm55")
        except ValueError:
            logger.exception("failed")
    finally:
        undo()
        logger.removeHandler(handler)
    assert sys.stdout is before
    assert "aws-secret-Lm55" not in buffer.getvalue() and "key *** in s3://***@b/x" in buffer.getvalue()
    assert "ValueError: boom ***" in buffer.getvalue()


def test_cli_errors_are_one_redacted_line(capfd):
    from workflows.cli import main

    code = main(["summary", "s3://user:Cli/Pass-4r@bucket/data"])
    printed = capfd.readouterr()
    assert code == 1
    assert "Cli/Pass-4r" not in printed.out + printed.err and "Traceback" not in printed.err
    (line,) = [line for line in printed.err.splitlines() if line.strip()]
    assert line.startswith("residual-ad summary: error: ValueError: s3://***@bucket/data")


def test_s3_urls_with_credentials_are_rejected_before_any_client_sees_them():
    for url in ("s3://user:Sl/AsH@bucket/x", "s3://token@bucket/x", "s3://u:p@b"):
        with pytest.raises(ValueError, match="credentials in S3 URLs are not supported") as caught:
            storage.resolve(url)
        assert "Sl/AsH" not in str(caught.value) and "token@" not in str(caught.value)
        with pytest.raises(ValueError):
            storage.arrow_filesystem(url)
