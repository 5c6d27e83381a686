"""`residual-ad summary URL`: image counts per dataset / category / split / label of a dataset."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("summary", help="counts per dataset/category/split/label of a dataset",
                                   description="Print counts from the dataset manifest (no image is read).")
    parser.add_argument("url", metavar="URL", help="dataset URL (local path, file://, s3://)")
    parser.add_argument("--json", action="store_true", help="print the counts as JSON")
    parser.set_defaults(run=run)


def summary_rows(url: str) -> list[dict]:
    """One dict per partition: dataset, category, split, rows, normal, anomalous, unknown, masks."""
    from workflows.datasets import read_manifest

    return [
        {"dataset": p["dataset"], "category": p["category"], "split": p["split"], "rows": p["rows"],
         "normal": p["labels"].get("0", 0), "anomalous": p["labels"].get("1", 0),
         "unknown": p["labels"].get("null", 0), "masks": p.get("masks", 0)}
        for p in read_manifest(url)["partitions"]
    ]


def format_summary(rows: list[dict]) -> str:
    header = ("dataset", "category", "split", "rows", "normal", "anomalous", "unknown", "masks")
    table = [header] + [tuple(str(r[h]) for h in header) for r in rows]
    totals = {h: sum(r[h] for r in rows) for h in header[3:]}
    table.append(("TOTAL", "", "", *(str(totals[h]) for h in header[3:])))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
                     for line in table)


def run(args: argparse.Namespace) -> int:
    import sys

    from workflows.datasets import DatasetNotFoundError
    from workflows.storage import redact

    try:
        rows = summary_rows(args.url)
    except DatasetNotFoundError as exc:
        print(f"error: {redact(exc)}", file=sys.stderr)
        return 1
    print(json.dumps(rows, indent=2) if args.json else format_summary(rows))
    return 0
