"""The `residual-ad` command line: one subcommand per module in `workflows.commands`.

Everything that leaves the process is redacted (`workflows.redaction`): stdout, stderr and logging go
through redacting streams for the whole command, the passwords of the URLs in the arguments and the
config file are registered as secrets first (and passed on to Ray workers), and an error ends the
command with one redacted line on stderr (`residual-ad <command>: error: ...`, exit code 1) instead of
a traceback; `RESIDUAL_AD_TRACEBACK=1` (or `--debug`) prints the (redacted) traceback too.
A user error (`ConfigError`: a bad config value, missing data, an unknown method, dataset or category,
too few references -- checked on the driver before Ray starts, see `workflows.validate`) prints
`residual-ad <command>: error: <what> (<where>): <why>; <what to do>` and exits 2; other failures exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import traceback

from workflows import redaction

# name on the command line -> module under workflows.commands (kept light to import)
COMMANDS: dict[str, str] = {
    "ingest": "ingest",
    "build-bench": "build_bench",
    "summary": "summary",
    "index": "index",
    "train": "train",
    "evaluate": "evaluate",
    "lodo": "lodo",
    "scan": "scan",
    "predict": "predict",
    "log-results": "log_results",
}


def _available_commands() -> dict[str, object]:
    modules = {}
    for name, module_name in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(f"workflows.commands.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"workflows.commands.{module_name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="residual-ad",
        description="Few-shot, class-agnostic image anomaly detection with residual features.",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"print the (redacted) traceback of an error too (same as {TRACEBACK_ENV}=1); "
                             "accepted anywhere on the command line")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _available_commands().values():
        module.add_parser(subparsers)
    return parser


TRACEBACK_ENV = "RESIDUAL_AD_TRACEBACK"
USER_ERROR_EXIT = 2  # a user error (ConfigError); argparse's usage errors exit 2 too
# what the operator does about an error of this kind (by exception class name, Ray's included)
_HINTS = {
    "StorageError": "check the object store (endpoint, credentials, network); rerun the same command to "
                    "resume from the committed work",
    "ActorDiedError": "a worker died more often than evaluate.max_retries allows; rerun the same command "
                      "to resume from the committed shards",
    "ActorUnavailableError": "a worker stayed unreachable; rerun the same command to resume",
    "WorkerCrashedError": "a worker process crashed repeatedly; rerun the same command to resume",
    "OutOfMemoryError": "a worker ran out of memory; lower evaluate.batch_size or use bigger nodes, then "
                        "rerun the same command to resume",
    "ExecutionTimeoutError": "the pipeline made no progress (RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S); "
                             "rerun the same command to resume",
}


def _register_secrets(argv: list[str]) -> None:
    """Register the password of every URL in the arguments and in the config file they name."""
    redaction.register_urls_in(argv)
    for index, item in enumerate(argv):
        path = None
        if item in ("-c", "--config") and index + 1 < len(argv):
            path = argv[index + 1]
        elif item.startswith("--config="):
            path = item.split("=", 1)[1]
        if path:
            try:
                from workflows.storage import read_bytes

                redaction.register_urls_in(read_bytes(path).decode(errors="replace"))
            except Exception:  # noqa: BLE001 - the command reports an unreadable config itself
                pass
    redaction.export_to_environ()  # local Ray workers (children) inherit the registered secrets


def root_cause(exc: BaseException) -> BaseException:
    """The error under Ray's wrappers (`RayTaskError(X)` -> X, Ray Data's user-code wrappers -> cause)."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        cause = getattr(exc, "cause", None)
        module = type(exc).__module__ or ""
        if isinstance(cause, BaseException) and type(exc).__name__.startswith("RayTaskError"):
            exc = cause
        elif module.startswith("ray.") and type(exc).__name__.endswith("UserCodeException") \
                and exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    return exc


_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception|Exit|Interrupt))(?:\([\w.]+\))?: (.+)$")
_WRAPPERS = ("RayTaskError", "UserCodeException", "RayError", "RayActorError")


def describe(exc: BaseException) -> str:
    """One redacted line: the root error's type and first line, and what to do about it."""
    inner = root_cause(exc)
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    name = type(inner).__name__
    text = f"{name}: {lines[0]}" if lines else name
    if name.endswith("UserCodeException"):
        # Ray Data's wrapper of an error in a pipeline stage; its cause does not travel, but the remote
        # traceback in the outer error's text names it ("pkg.module.StorageError: read s3://...")
        for line in str(exc).splitlines():
            match = _ERROR_LINE.match(line.strip())
            if match and not match.group(1).startswith(_WRAPPERS):
                name, text = match.group(1), f"{match.group(1)}: {match.group(2).strip()}"
                lines = [text]
                break
    hint = _HINTS.get(name.split("(")[0]) or next(
        (hint for key, hint in _HINTS.items() if key in name or any(key in line for line in lines[:3])), None)
    if hint:
        text += f" ({hint})"
    return redaction.redact(text)


def main(argv: list[str] | None = None) -> int:
    """Run one command. As the program (`argv` None) the redaction stays installed until the process
    ends (Ray's and other libraries' exit handlers print too); called with `argv` (tests, embedding)
    it is undone on return."""
    as_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    undo = redaction.install()
    try:
        _register_secrets(argv)
        if as_program:  # Ray records the driver's command line (job table, logs): keep it redacted
            sys.argv[:] = [redaction.redact(item) for item in sys.argv]
        parser = build_parser()
        debug = "--debug" in argv
        args = parser.parse_args([item for item in argv if item != "--debug"])
        show_traceback = debug or os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
        try:
            return int(args.run(args) or 0)
        except KeyboardInterrupt:
            print(f"residual-ad {args.command}: interrupted; rerun the same command to resume",
                  file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the top of the command: one clear, redacted line
            from workflows.config import ConfigError

            if show_traceback:
                traceback.print_exception(exc, file=sys.stderr)
            if isinstance(root_cause(exc), ConfigError):  # the user's to fix: the message says how
                print(f"residual-ad {args.command}: error: {redaction.redact(str(root_cause(exc)))}",
                      file=sys.stderr)
                return USER_ERROR_EXIT
            print(f"residual-ad {args.command}: error: {describe(exc)}", file=sys.stderr)
            return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        if not as_program:
            undo()


if __name__ == "__main__":
    sys.exit(main())
