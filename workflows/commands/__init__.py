"""CLI subcommands: each module has `add_parser(subparsers)` (light imports) and sets `run`."""
