"""The local stack: S3 server + MLflow server (artifacts on that S3) + Ray head, all on 127.0.0.1.

    python -m infra.local.stack up [--state-dir .stack] [--no-ray] [--no-mlflow]   # prints `export ...`
    eval "$(python -m infra.local.stack env)"                                         # use it
    python -m infra.local.stack down                                                  # clean stop
    python -m infra.local.stack run -- residual-ad lodo ...                           # up, run, down

`up` leaves the services running in the background and records their process ids in
`<state-dir>/stack.json`; `down` stops exactly those process groups and reports leftovers.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from infra.local.services import MlflowService, RayHead, S3Service, alive, stop_group

STATE_FILE = "stack.json"
DEFAULT_BUCKET = "residual-ad"


@dataclass
class LocalStack:
    """Start/stop the services together; `env()` is what a client exports."""

    state_dir: Path
    bucket: str = DEFAULT_BUCKET
    with_mlflow: bool = True
    with_ray: bool = True
    ray_num_cpus: int = 2
    detached: bool = False  # True: the services outlive this process (`up`); else they die with it
    s3: S3Service | None = field(default=None, init=False)
    mlflow: MlflowService | None = field(default=None, init=False)
    ray: RayHead | None = field(default=None, init=False)

    def start(self) -> LocalStack:
        self.state_dir = Path(self.state_dir).resolve()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            keep = {"die_with_parent": not self.detached}
            self.s3 = S3Service(self.state_dir, **keep).start()
            self.s3.create_bucket(self.bucket)
            if self.with_mlflow:
                self.mlflow = MlflowService(self.state_dir, artifacts_destination=f"s3://{self.bucket}/mlflow",
                                            s3_env=self.s3.env(), **keep).start()
            if self.with_ray:
                node_env = {**self.s3.env(), **(self.mlflow.env() if self.mlflow else {})}
                self.ray = RayHead(self.state_dir, num_cpus=self.ray_num_cpus, node_env=node_env,
                                   **keep).start()
        except Exception:
            self.stop()
            raise
        return self

    def services(self) -> list:
        return [s for s in (self.ray, self.mlflow, self.s3) if s is not None]

    def stop(self) -> list[int]:
        """Stop Ray, then MLflow, then S3; returns pids left over (empty when clean)."""
        left: list[int] = []
        for service in self.services():
            left += service.stop()
        self.ray = self.mlflow = self.s3 = None
        return left

    def env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for service in reversed(self.services()):
            out.update(service.env())
        out["RESIDUAL_AD_BUCKET"] = f"s3://{self.bucket}"
        return out

    def state(self) -> dict:
        return {"env": self.env(), "services": {s.name: {"pid": s.pid, "pids": s.pids}
                                                for s in self.services()}}

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def export_lines(env: dict[str, str]) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items()))


def _read_state(state_dir: Path) -> dict | None:
    path = state_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def down(state_dir: Path) -> list[int]:
    """Stop the services recorded by `up` in `state_dir` (only those process groups)."""
    state = _read_state(state_dir)
    if state is None:
        return []
    left: list[int] = []
    for name in ("ray", "mlflow", "s3"):
        entry = state["services"].get(name)
        if entry and alive([entry["pid"]]):
            left += stop_group(None, entry["pid"], entry["pids"])
        elif entry:
            left += stop_group(None, None, entry["pids"])
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return left


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.local.stack", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["up", "down", "env", "status", "run"])
    parser.add_argument("--state-dir", default=".stack", help="where logs, sqlite db and state go (.stack)")
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument("--no-ray", action="store_true", help="do not start a Ray head (local Ray per run)")
    parser.add_argument("--no-mlflow", action="store_true")
    parser.add_argument("--ray-cpus", type=int, default=2)
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    state_dir = Path(args.state_dir).resolve()

    if args.action in ("env", "status"):
        state = _read_state(state_dir)
        if state is None:
            print(f"no stack recorded in {state_dir}", file=sys.stderr)
            return 1
        if args.action == "env":
            print(export_lines(state["env"]))
        else:
            for name, entry in state["services"].items():
                print(f"{name}: pid {entry['pid']} {'running' if alive([entry['pid']]) else 'stopped'}")
        return 0
    if args.action == "down":
        left = down(state_dir)
        print("stack stopped" + (f"; leftover pids {left}" if left else ""), file=sys.stderr)
        return 1 if left else 0
    if _read_state(state_dir) is not None and args.action == "up":
        print(f"a stack is already recorded in {state_dir}; run `down` first", file=sys.stderr)
        return 1
    if args.action == "run" and not command:
        parser.error("run: give a command after --")
    stack = LocalStack(state_dir, bucket=args.bucket, with_mlflow=not args.no_mlflow,
                       with_ray=not args.no_ray, ray_num_cpus=args.ray_cpus, detached=args.action == "up")
    started = time.monotonic()
    stack.start()
    print(f"stack up in {time.monotonic() - started:.1f}s (logs in {state_dir})", file=sys.stderr)
    if args.action == "up":
        (state_dir / STATE_FILE).write_text(json.dumps(stack.state(), indent=1))
        print(export_lines(stack.env()))
        return 0
    try:
        return subprocess.call(command, env={**os.environ, **stack.env()})
    finally:
        left = stack.stop()
        if left:
            print(f"leftover pids after stop: {left}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
