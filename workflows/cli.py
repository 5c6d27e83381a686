"""The `residual-ad` command line: one subcommand per module in `workflows.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in _available_commands().values():
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
