"""`residual-ad build-bench DEST_URL`: write the offline benchmark (synthetic defects on real photos,
real ELPV solar cells) in the project's dataset format."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "build-bench",
        help="write the offline benchmark (synthetic defects on real photos + ELPV) to DEST_URL",
        description=(
            "Build the offline benchmark from real photos bundled in installed packages (scikit-image, "
            "scikit-learn) with synthetic defects and pixel masks, plus real solar-cell defects from "
            "elpv-dataset, and write it as a residual-ad dataset. Results on it are 'synthetic defects on "
            "real photos', not comparable to MVTec AD numbers. See docs/benchmark.md."
        ),
    )
    parser.add_argument("dest_url", metavar="DEST_URL", help="local path, file:// or s3://bucket/prefix")
    parser.add_argument("--seed", type=int, default=0,
                        help="generator seed (default 0); same seed, same bytes")
    parser.add_argument("--scale", choices=("small", "full"), default="small",
                        help="small: ~28 images per category at 128 px (tests, demo); full: as many as the "
                             "sources allow, native resolution (default small)")
    parser.add_argument("--elpv-uncertain", action="store_true",
                        help="also put ELPV cells with defect probability 1/3 and 2/3 in the test split "
                             "(label 1)")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated subset of: textures, photos, elpv (default all)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from workflows.bench import BenchConfig, build_bench
    from workflows.storage import redact

    datasets = None if not args.datasets else tuple(n.strip() for n in args.datasets.split(",") if n.strip())
    try:
        config = BenchConfig(seed=args.seed, scale=args.scale, elpv_uncertain=args.elpv_uncertain,
                             datasets=datasets)
        summary = build_bench(args.dest_url, config,
                              progress=lambda text: print(f"  {text}", file=sys.stderr))
    except (ValueError, FileNotFoundError) as exc:
        print(f"build-bench: {redact(str(exc))}", file=sys.stderr)
        return 2
    print(f"wrote {summary.rows} images to {summary.dest_url} (seed {summary.seed}, scale {summary.scale})")
    print(f"manifest: {summary.manifest_url}")
    header = ("dataset/category", "test normal", "test anom.", "AUROC size", "AUROC mean")
    print(f"{header[0]:<22} {header[1]:>11} {header[2]:>10} {header[3]:>10} {header[4]:>10}")
    for key, fig in summary.categories.items():
        print(f"{key:<22} {fig['test_normal']:>11} {fig['test_anomalous']:>10} "
              f"{_fmt(fig['auroc_encoded_size']):>10} {_fmt(fig['auroc_mean_intensity']):>10}")
    print("AUROC of encoded size / mean intensity alone: near 0.5 means trivial statistics cannot tell "
          "normal from anomalous test images.")
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
