"""The local services, one class each, every one on 127.0.0.1 in its own process group.

- `S3Service`: an S3-compatible server (MinIO when a `minio` binary is installed, else moto's server).
- `MlflowService`: `mlflow server` with a sqlite backend and proxied artifacts on the S3 server.
- `RayHead`: a Ray head node (`ray start --head --block`) on free ports.

Each service starts as a new session (its own process group), so `stop()` signals exactly the
processes it started (never other users' servers or Ray clusters) and then checks that none is left.
The same classes back the test fixtures (`tests/fixtures/`) and the `python -m infra.local.stack` CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
DEFAULT_KEY_ID = "local-stack-key-id"
DEFAULT_SECRET = "local-stack-secret-key"  # local fake; the real ones come from the environment


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    """A console script of this Python's environment, else the one on PATH."""
    script = Path(sys.executable).with_name(name)
    return str(script) if script.exists() else (shutil.which(name) or name)


def _wait_http(url: str, process: subprocess.Popen, timeout_s: float, what: str, log: Path | None) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{what} exited with code {process.returncode} before answering {url}\n{tail}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f}s") from None
            time.sleep(0.3)


def _parent_death_signal() -> None:
    """In the child before exec (Linux): get SIGTERM when the parent dies, so a killed test run
    leaves no server behind. A no-op elsewhere."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (psutil), for leftover checks."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root.pid, *(child.pid for child in root.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def alive(pids: list[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            continue
    return out


def stop_group(process: subprocess.Popen | None, pgid: int | None, known: list[int],
               timeout_s: float = 20) -> list[int]:
    """SIGTERM the service's process group, wait, SIGKILL what is left (group and known pids by id).

    Returns the pids still alive afterwards (empty on a clean stop)."""
    known = list(dict.fromkeys([*known, *(process_tree(pgid) if pgid else [])]))
    if pgid is not None:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None:
            process.poll()
        if not alive(known):
            break
        time.sleep(0.2)
    stragglers = alive(known)
    for pid in stragglers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pgid is not None and stragglers:  # children started after our last look, still in the group
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if process is not None:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.2)
    return alive(known)


@dataclass
class Service:
    """Common start/stop bookkeeping: one child process leading its own session."""

    workdir: Path
    process: subprocess.Popen | None = field(default=None, init=False, repr=False)
    pid: int | None = field(default=None, init=False)
    pids: list[int] = field(default_factory=list, init=False)  # descendants seen while running
    # end the service if this process dies without stopping it (tests); False for `stack up` (detached)
    die_with_parent: bool = field(default=True, kw_only=True)

    name = "service"

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
        try:
            self.process = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                env={**os.environ, **(env or {})}, start_new_session=True,
                preexec_fn=_parent_death_signal if self.die_with_parent else None,
            )
        finally:
            log.close()
        self.pid = self.process.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def remember_children(self) -> None:
        if self.pid is not None:
            self.pids = list(dict.fromkeys([*self.pids, *process_tree(self.pid)]))

    def running(self) -> bool:
        return self.pid is not None and bool(alive([self.pid]))

    def stop(self, timeout_s: float = 20) -> list[int]:
        """Stop everything this service started; returns leftover pids (empty when clean)."""
        if self.pid is None:
            return []
        self.remember_children()
        left = stop_group(self.process, self.pid, self.pids, timeout_s)
        self.process, self.pid = None, None
        return left


@dataclass
class S3Service(Service):
    """S3-compatible server: MinIO when installed (or `engine="minio"`), else moto's server mode."""

    port: int = 0
    key_id: str = DEFAULT_KEY_ID
    secret: str = DEFAULT_SECRET
    engine: str = "auto"  # auto | moto | minio
    region: str = "us-east-1"

    name = "s3"

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        if self.engine == "auto":
            self.engine = "minio" if shutil.which("minio") else "moto"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 120) -> S3Service:
        if self.engine == "minio":
            data = self.workdir / "minio-data"
            data.mkdir(parents=True, exist_ok=True)
            self._spawn([shutil.which("minio") or "minio", "server", str(data),
                         "--address", f"{HOST}:{self.port}", "--console-address", f"{HOST}:{free_port()}"],
                        {"MINIO_ROOT_USER": self.key_id, "MINIO_ROOT_PASSWORD": self.secret})
            health = f"{self.endpoint_url}/minio/health/live"
        else:
            self._spawn([sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)])
            health = f"{self.endpoint_url}/moto-api/"
        try:
            _wait_http(health, self.process, timeout_s, f"{self.engine} S3 server", self.log_path)
        except RuntimeError:
            self.stop()
            raise
        self.remember_children()
        return self

    def env(self) -> dict[str, str]:
        """What a client exports to use this server (the standard AWS variables)."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_DEFAULT_REGION": self.region}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.key_id,
                            aws_secret_access_key=self.secret, region_name=self.region)

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass


@dataclass
class MlflowService(Service):
    """`mlflow server`: sqlite backend in `workdir`; artifacts proxied by the server to
    `artifacts_destination` (an s3:// URL on the local S3 server, or a local folder)."""

    artifacts_destination: str = ""
    port: int = 0
    s3_env: dict[str, str] = field(default_factory=dict)  # the S3 server's env, for the server only

    name = "mlflow"

    def __post_init__(self) -> None:
        self.port = self.port or free_port()
        if not self.artifacts_destination:
            self.artifacts_destination = str(self.workdir / "artifacts")

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self, timeout_s: float = 300) -> MlflowService:
        env = dict(self.s3_env)
        if "AWS_ENDPOINT_URL" in env:
            env["MLFLOW_S3_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"]
        self._spawn([_bin("mlflow"), "server", "--host", HOST, "--port", str(self.port),
                     "--backend-store-uri", f"sqlite:///{self.workdir / 'mlflow.db'}",
                     "--artifacts-destination", self.artifacts_destination, "--serve-artifacts",
                     "--workers", "1"], env)
        try:
            _wait_http(f"{self.tracking_uri}/health", self.process, timeout_s, "mlflow server", self.log_path)
        except RuntimeError:
            self.stop()
            raise
        self.remember_children()
        return self

    def env(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}


@dataclass
class RayHead(Service):
    """A Ray head node on this machine with every port chosen free (several can share a machine).

    Ray never advertises a loopback address (it replaces 127.0.0.1 by the host's own address), so
    `address` is the GCS port on 127.0.0.1 and Ray's nodes talk over the host address."""

    num_cpus: int = 2
    object_store_bytes: int = 200 * 1024 * 1024
    port: int = 0
    # environment of the node's workers, as a cluster node gets from its deployment (S3, MLflow)
    node_env: dict[str, str] = field(default_factory=dict)

    name = "ray"

    def __post_init__(self) -> None:
        self.port = self.port or free_port()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self, timeout_s: float = 300) -> RayHead:
        # a short temp dir: Ray's unix sockets must fit in 107 characters
        self.temp_dir = Path(f"/tmp/rad-{os.getpid()}-{self.port}")
        ports = {flag: free_port() for flag in (
            "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
            "--runtime-env-agent-port", "--metrics-export-port", "--node-manager-port",
            "--object-manager-port")}
        argv = [_bin("ray"), "start", "--head", "--block", "--node-ip-address", HOST,
                "--port", str(self.port),
                "--num-cpus", str(self.num_cpus), "--object-store-memory", str(self.object_store_bytes),
                "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(self.temp_dir)]
        for flag, port in ports.items():
            argv += [flag, str(port)]
        self.workdir.mkdir(parents=True, exist_ok=True)
        token = self.workdir / "ray_auth_token"
        if not token.exists():
            import secrets

            token.write_text(secrets.token_hex(32))
            token.chmod(0o600)
        # no drain phase on SIGTERM: a local head has no traffic to quiesce, stop is immediate
        self._spawn(argv, {**self.node_env, "RAY_USAGE_STATS_ENABLED": "0",
                           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **self.env(with_address=False)})
        deadline = time.monotonic() + timeout_s
        while not (self._gcs_up() and "Ray runtime started" in self.log_path.read_text(errors="replace")):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"ray head did not start on {self.address}\n{tail}")
            time.sleep(0.5)
        self.remember_children()
        return self

    def _gcs_up(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1):
                return True
        except OSError:
            return False

    def env(self, with_address: bool = True) -> dict[str, str]:
        """RAY_ADDRESS plus token authentication with this head's own token file (never the value)."""
        out = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.workdir / "ray_auth_token")}
        return {"RAY_ADDRESS": self.address, **out} if with_address else out

    def stop(self, timeout_s: float = 30) -> list[int]:
        left = super().stop(timeout_s)
        temp_dir = getattr(self, "temp_dir", None)
        if temp_dir is not None and not left:
            shutil.rmtree(temp_dir, ignore_errors=True)
        return left
