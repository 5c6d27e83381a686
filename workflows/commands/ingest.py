"""`residual-ad ingest`: convert a source tree (mvtec, visa, btad, mpdd, folder) to the Parquet dataset."""

from __future__ import annotations

import argparse
import sys

LAYOUT_CHOICES = ("mvtec", "visa", "btad", "mpdd", "folder")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="convert an image dataset tree into the residual-ad Parquet dataset format",
        description="Convert SOURCE (a local path, file:// or s3:// URL) in the given layout into the "
        "Parquet dataset at DEST_URL. Bad inputs are quarantined by path and reason in "
        "DEST_URL/_quarantine/<dataset>.json; the valid rest is written. Re-running replaces this "
        "dataset's partitions atomically.",
    )
    parser.add_argument("--format", required=True, choices=LAYOUT_CHOICES, help="source layout")
    parser.add_argument("source", metavar="SOURCE", help="source tree URL")
    parser.add_argument("dest", metavar="DEST_URL", help="dataset URL (local path, file://, s3://)")
    parser.add_argument("--dataset", help="dataset name (default: the format; folder: the source's name)")
    parser.add_argument("--strict", action="store_true", help="fail (and write nothing) on any quarantine")
    parser.add_argument("--max-pixels", type=int, default=None, help="reject images above this many pixels")
    parser.add_argument("--workers", type=int, default=4, help="decode threads for validation")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from residual_core.images import DEFAULT_MAX_PIXELS
    from workflows.ingest import IngestOptions, StrictIngestError, ingest
    from workflows.storage import redact

    options = IngestOptions(
        layout=args.format, dataset=args.dataset, strict=args.strict,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS, workers=args.workers, progress=not args.no_progress,
    )
    try:
        result = ingest(args.source, args.dest, options)
    except StrictIngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 1
    for line in result.report.summary_lines():
        print(line)
    for line in result.report.reference_warnings():
        print(line, file=sys.stderr)
    print(f"quarantine report: {redact(result.report_url)}")
    return 0
