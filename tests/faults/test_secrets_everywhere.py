"""No secret leaves the process, whatever the command and however it ends.

Every command (`ingest`, `index`, `train`, `evaluate`, `lodo`, `scan`, `log-results`) runs as the real
program (`python -m workflows.cli`) against a Ray head (`infra/local`, the cluster path of `init_ray`),
the S3 server and a real MLflow server, with secrets planted in the AWS environment, in an authenticated
MLflow URI (a password with '/' and '@', percent-encoded), in `MLFLOW_TRACKING_TOKEN`, and in URLs given
on the command line (raw with '/', and percent-encoded), in successful and failing runs. Then every byte
that left is searched: stdout and stderr of each run, Ray's session logs (the head's temp dir), every
output object (local, and the whole S3 bucket: data, outputs, MLflow artifacts) and the MLflow store.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("ray")

from tests.fixtures.s3 import FAKE_KEY_ID, FAKE_SECRET  # noqa: E402
from tests.workflows.ingest.trees import build_folder_tree  # noqa: E402
from tests.workflows.pipelines.tiny_data import write_tiny  # noqa: E402
from tests.workflows.scan.archive import upload, write_archive, write_normals  # noqa: E402

pytestmark = pytest.mark.timeout(1800)
ROOT = Path(__file__).resolve().parents[2]
SESSION_TOKEN = "session-token-Rt5uV8wX2y"
TRACKING_TOKEN = "tracking-token-Pq7Lm2Xv"
MLFLOW_PASSWORD = "Mlf/pa@ss-Hn6k"  # in the URI percent-encoded, as a URL must hold '/' and '@'
URL_PASSWORD = "Sl/AsH-Kw93"  # raw in a URL, as users type it (botocore once printed it in full)
ENCODED_PASSWORD = "p%40ss%2Fw0rd-Jx5"  # percent-encoded in a URL; decoded "p@ss/w0rd-Jx5"
TRAINABLE = "{name: resadpp, params: {epochs: 1, first_stage_epochs: 1, batch_size: 4, coupling_layers: 2}}"


def _forms(value: str) -> set[str]:
    from urllib.parse import unquote

    raw = unquote(value)
    return {value, raw, quote(raw, safe=""), quote(raw)}


PLANTED = (FAKE_SECRET, FAKE_KEY_ID, SESSION_TOKEN, TRACKING_TOKEN, MLFLOW_PASSWORD, URL_PASSWORD,
           ENCODED_PASSWORD)
SECRETS = sorted(set().union(*(_forms(v) for v in PLANTED)))


@pytest.fixture(scope="module")
def stack(s3_server, mlflow_server, tmp_path_factory):
    """A Ray head (its workers inherit the S3 environment, as a cluster node's would) for the module."""
    from infra.local.services import RayHead

    head = RayHead(tmp_path_factory.mktemp("ray-head"), num_cpus=2).start()
    try:
        yield head
    finally:
        head.stop()


@pytest.fixture(scope="module")
def planted(stack, s3_server, mlflow_server, tmp_path_factory):
    """Inputs and the environment of every run: the secrets planted where a user would put them."""
    work = tmp_path_factory.mktemp("secrets")
    data = write_tiny(s3_server.unique_url("data"), n_train=2, n_normal=2, n_anomalous=2)
    source = work / "parts"
    build_folder_tree(source)
    write_archive(str(work / "archive"), per_category=3, bad=False, no_reference_images=0)
    archive = s3_server.unique_url("archive")
    upload(str(work / "archive"), archive)
    write_normals(str(work / "references"), 1, seed=1)
    uri = mlflow_server.tracking_uri.replace("http://", f"http://mlf-user:{quote(MLFLOW_PASSWORD, safe='')}@")
    env = {**os.environ, **stack.env(), "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_TOKEN": TRACKING_TOKEN,
           "AWS_SESSION_TOKEN": SESSION_TOKEN, "PYTHONUNBUFFERED": "1", "RESIDUAL_AD_S3_DEADLINE_S": "120"}
    return {"work": work, "data": data, "source": source, "env": env, "output": s3_server.unique_url("out"),
            "archive": archive, "bucket": s3_server.bucket, "runs": []}


def _run(planted: dict, name: str, argv: list[str], env: dict | None = None, timeout: int = 900):
    """The program, as a user runs it; its stdout and stderr are kept for the final search."""
    out, err = planted["work"] / f"{name}.out", planted["work"] / f"{name}.err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        code = subprocess.run([sys.executable, "-m", "workflows.cli", *argv], cwd=ROOT, stdout=stdout,
                              stderr=stderr, env=env or planted["env"], timeout=timeout).returncode
    planted["runs"].append(name)
    return code, out.read_text(errors="replace"), err.read_text(errors="replace")


def _last_line(text: str) -> str:
    return [line.strip() for line in re.split(r"[\r\n]+", text) if line.strip()][-1]


def _sets(planted: dict, *items: str, output: str | None = None) -> list[str]:
    base = (f"data.url={planted['data']}", f"output={output or planted['output']}", "backbone.image_size=64",
            "index.shots=[1]", "index.seeds=[0]", "tracking.enabled=true", "tracking.experiment=secrets",
            "evaluate.shard_size=4")
    return [f"--set={item}" for item in (*base, *items)]


WORKER = """
import logging, sys, threading
from workflows import redaction
redaction.register_urls_in(sys.argv[1:])
import ray
from workflows.pipelines.ray_runtime import init_ray
init_ray(num_cpus=1)

@ray.remote
def leak(url):
    print("printed", url, flush=True)
    print("to stderr", url, file=sys.stderr, flush=True)
    logging.getLogger("residual-ad-test").warning("logged %s", url)
    raise ValueError(f"raised {url}")

class Watch:
    \"\"\"This driver's stdout, noting when Ray's log thread has forwarded the worker's print.\"\"\"
    def __init__(self, stream):
        self.stream, self.forwarded = stream, threading.Event()
    def write(self, text):
        if "printed " in text:
            self.forwarded.set()
        return self.stream.write(text)
    def __getattr__(self, name):
        return getattr(self.stream, name)

sys.stdout = Watch(sys.stdout)
try:
    ray.get(leak.remote(" ".join(sys.argv[1:])))
except ValueError:
    pass
sys.stdout.forwarded.wait(timeout=300)  # forwarding is asynchronous: wait for it, not for a fixed time
# one write on its own line: Ray's log thread prints the workers' lines into this same stdout
sys.stdout.write(f"\\nSESSION {ray._private.worker._global_node.get_session_dir_path()}\\n")
sys.stdout.flush()
"""


@pytest.mark.parametrize("where", ["head", "local"])
def test_ray_workers_redact_what_they_print_log_and_raise(stack, planted, where, tmp_path):
    """`init_ray`'s runtime env: every worker redacts its own output with the driver's registered
    secrets, so Ray's session logs (worker .out/.err, the driver's, the raylet's) hold none."""
    import shutil
    import uuid

    urls = [f"s3://s3user:{URL_PASSWORD}@bucket/x", f"https://tok:{ENCODED_PASSWORD}@host/y"]  # task args
    env = {**planted["env"]}
    short = Path(f"/tmp/rad-{uuid.uuid4().hex[:8]}")  # Ray's socket paths must stay short
    if where == "local":
        env.update(RAY_ADDRESS="", RAY_TMPDIR=str(short))
    try:
        run = subprocess.run([sys.executable, "-c", WORKER, *urls], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        found = re.search(r"^SESSION (\S+)$", run.stdout, re.MULTILINE)
        assert found, f"no SESSION line in the driver's stdout:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
        session = Path(found.group(1))
        assert session.is_dir() and list(session.rglob("worker-*.out"))
        files = [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()]
        leaks = [f"{path}: {secret}" for path in files for secret in SECRETS
                 if secret.encode() in path.read_bytes()]
        assert not leaks, "\n".join(leaks[:20])
        # the worker's print reached this driver (which does not redact) already redacted
        assert "printed s3://***@bucket/x https://***@host/y" in run.stdout, run.stdout[-3000:]
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_every_command_keeps_every_secret_in(planted, stack, s3_server, mlflow_server):
    data, output, work = planted["data"], planted["output"], planted["work"]
    bad_data = data.replace("s3://", f"s3://s3user:{URL_PASSWORD}@")
    bad_output = output.replace("s3://", f"s3://s3user:{ENCODED_PASSWORD}@")

    # --- successful runs of every command
    checks = {
        "ingest": ["ingest", "--format", "folder", "--no-progress", str(planted["source"]),
                   s3_server.unique_url("ingested")],
        "index": ["index", *_sets(planted, "data.datasets=[labels]")],
        "train": ["train", *_sets(planted, "train.datasets=[textures,labels]", "train.ref_shot=2",
                                  "train.max_images_per_category=4", f"method={TRAINABLE}")],
        "evaluate": ["evaluate", *_sets(planted, "data.datasets=[labels]")],
        "lodo": ["lodo", *_sets(planted, "data.datasets=[textures,labels]",
                                "lodo.methods=[{name: baseline}]")],
        "scan": ["scan", planted["archive"], "--references", str(work / "references"), "--threshold", "1.0",
                 "--output", str(work / "scan-out"), "--quiet", *_sets(planted)],
        "log-results": ["log-results", output],
    }
    for name, argv in checks.items():
        code, out, err = _run(planted, name, argv)
        assert code == 0, f"{name} failed:\n{err[-3000:]}"

    # --- failing runs: credentials in URLs, MLflow unreachable with a password in its URI
    code, _, err = _run(planted, "evaluate-bad-data", ["evaluate", *_sets(planted, f"data.url={bad_data}")])
    assert code == 1 and "credentials in S3 URLs are not supported" in _last_line(err), err[-3000:]
    code, _, err = _run(planted, "index-bad-output",
                        ["index", *_sets(planted, "data.datasets=[labels]", output=bad_output)])
    assert code == 1, err[-3000:]
    assert _last_line(err).startswith("residual-ad index: error: ValueError: s3://***@"), err[-3000:]
    code, _, err = _run(planted, "ingest-bad-source", ["ingest", "--format", "folder", "--no-progress",
                                                       bad_data, s3_server.unique_url("never")])
    assert code != 0 and "s3://***@" in err, err[-3000:]
    import socket

    with socket.socket() as refusing:  # bound, never listening: refuses, and no other process can take it
        refusing.bind(("127.0.0.1", 0))
        dead = f"http://mlf-user:{quote(MLFLOW_PASSWORD, safe='')}@127.0.0.1:{refusing.getsockname()[1]}"
        down_env = {**planted["env"], "MLFLOW_TRACKING_URI": dead, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
        code, _, err = _run(planted, "evaluate-mlflow-down",
                            ["evaluate", *_sets(planted, "data.datasets=[labels]")], env=down_env)
        assert code == 0 and "warning: MLflow tracking failed at http://***@127.0.0.1" in err, err[-3000:]
        code, _, err = _run(planted, "log-results-mlflow-down", ["log-results", output, "--force"],
                            env=down_env)
        assert code == 1 and "MLflow at http://***@127.0.0.1" in _last_line(err), err[-3000:]

    # --- search every byte that left
    places: list[Path] = [work, Path(stack.temp_dir), stack.workdir, mlflow_server.root]
    leaks = []
    for place in places:
        for path in place.rglob("*"):
            if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
                blob = path.read_bytes()
                leaks += [f"{path}: {secret}" for secret in SECRETS if secret.encode() in blob]
    client = _bucket_client(s3_server)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=s3_server.bucket)
    keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
    assert any(key.endswith("_manifest.json") for key in keys) and any("mlflow-" in key for key in keys)
    for key in keys:
        blob = client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read()
        leaks += [f"s3://{s3_server.bucket}/{key}: {secret}" for secret in SECRETS
                  if secret.encode() in blob or secret in key]
    assert not leaks, "\n".join(leaks[:50])
    # the search looked where the runs wrote: their logs, Ray's session, outputs
    assert list(Path(stack.temp_dir).rglob("worker-*.out")) and (work / "scan-out" / "_SUCCESS").exists()


def _bucket_client(s3_server):
    import boto3

    return boto3.client("s3", endpoint_url=s3_server.endpoint_url, aws_access_key_id=FAKE_KEY_ID,
                        aws_secret_access_key=FAKE_SECRET, region_name="us-east-1")
