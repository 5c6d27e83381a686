"""`residual-ad scan`: score an unlabeled archive, flag suspicious images, keep where the defect is."""

from __future__ import annotations

import argparse
import re

from workflows.config import add_config_arguments

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def byte_size(text: str) -> int:
    """'268435456', '256M', '256MiB', '1.5G' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 268435456, 256M, 256MiB, 1G)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "scan", help="score a large unlabeled image archive against a few normal references per category")
    parser.add_argument("input", help="raw image prefix (local dir or s3://; <category>/<images> unless "
                                      "--category) or a Parquet dataset")
    parser.add_argument("--references", required=True,
                        help="normal references: <category>/<images> folder or prefix, or a Parquet dataset")
    parser.add_argument("--output", "-o", required=True, help="output URL (local path or s3://)")
    parser.add_argument("--normals", help="held-out normal images (<category>/<images>) for calibration")
    parser.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate (default 0.01)")
    parser.add_argument("--threshold", type=float, help="fixed score threshold for every category")
    parser.add_argument("--thresholds", metavar="FILE",
                        help="per-category thresholds: JSON or YAML {category: threshold} (local or s3://); "
                             "categories it lacks fall back to --thresholds-from, the calibration on "
                             "--normals or --threshold")
    parser.add_argument("--thresholds-from", metavar="URL",
                        help="use the per-category thresholds of an earlier scan (its output URL, or its "
                             "summary.json / calibration.json) for the categories --thresholds lacks")
    parser.add_argument("--category", help="every input image belongs to this category")
    parser.add_argument("--split", default="unlabeled", help="Parquet input: split to scan")
    parser.add_argument("--shard-size", type=int, default=64, help="images per resumable shard (default 64)")
    parser.add_argument("--k-shot", type=int, help="references per category (default: all given)")
    parser.add_argument("--max-pixels", type=int,
                        help="images with more pixels are skipped (bomb guard; JPEGs are decoded reduced "
                             "when that fits; default 16777216 = 4096x4096)")
    parser.add_argument("--max-bytes", type=byte_size,
                        help="files larger than this are skipped unread (default 128MiB)")
    parser.add_argument("--read-timeout", type=float,
                        help="seconds per file before its read is given up and it is skipped (default 60)")
    parser.add_argument("--jpeg-draft", action="store_true",
                        help="decode every JPEG reduced (DCT 1/2..1/8) to >= 2x the model size: less memory "
                             "and time, slightly different scores for large JPEGs")
    parser.add_argument("--decode-memory", type=byte_size,
                        help="Ray memory reserved per decode task (default: estimated from the limits; 0: "
                             "none)")
    parser.add_argument("--no-maps", action="store_true",
                        help="do not store heat maps and overlay PNGs of flagged images")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def _options(args):
    from workflows.pipelines.raw_images import DEFAULT_MAX_BYTES, DEFAULT_READ_TIMEOUT_S
    from workflows.pipelines.scan import SCAN_MAX_PIXELS, ScanOptions
    from workflows.storage import absolute

    return ScanOptions(
        input=absolute(args.input), output=absolute(args.output), references=absolute(args.references),
        normals=absolute(args.normals) if args.normals else None,
        target_fpr=args.fpr, threshold=args.threshold, category=args.category, split=args.split,
        thresholds_file=absolute(args.thresholds) if args.thresholds else None,
        thresholds_from=absolute(args.thresholds_from) if args.thresholds_from else None,
        shard_size=args.shard_size, k_shot=args.k_shot, max_pixels=args.max_pixels or SCAN_MAX_PIXELS,
        save_maps=not args.no_maps, max_bytes=args.max_bytes or DEFAULT_MAX_BYTES,
        read_timeout_s=args.read_timeout or DEFAULT_READ_TIMEOUT_S, jpeg_draft=args.jpeg_draft,
        decode_memory=args.decode_memory,
    )


def run(args) -> int:
    from workflows import storage
    from workflows.config import config_from_args
    from workflows.pipelines.ray_runtime import init_ray
    from workflows.pipelines.scan import run_scan

    config = config_from_args(args)
    options = _options(args)
    try:
        options.check()
    except ValueError as exc:
        print(exc)
        return 2
    from workflows.pipelines.scan_thresholds import check_threshold_options

    check_threshold_options(options, config)  # a bad thresholds file fails here, before Ray starts
    init_ray(config.ray_address)
    summary = run_scan(config, options, progress=not args.quiet)
    from workflows.tracking import Tracker, log_scan_run

    log_scan_run(Tracker(config.tracking.experiment, config.tracking.enabled, results_url=options.output),
                 config.to_dict(), summary)
    rate = summary["throughput_images_per_s"]
    print(f"scanned {summary['seen']} images: {summary['scored']} scored, {summary['skipped']} skipped, "
          f"{summary['flagged']} flagged ({summary['flagged_fraction']:.1%})"
          + (f", {rate:.1f} images/s" if rate else "") + f" -> {storage.redact(options.output)}")
    thresholds = summary.get("thresholds", {})
    for category, counts in summary["per_category"].items():
        used = thresholds.get(category)
        print(f"  {category}: {counts}"
              + (f"; threshold {used['threshold']} from {used['origin']}" if used else ""))
    return 0
