"""`residual-ad predict`: score a few images locally (no cluster) against normal references; print each
score, write overlays and scores.csv."""

from __future__ import annotations

from workflows.config import add_config_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="score a handful of images on this machine against a few normal references")
    parser.add_argument("input", metavar="IMAGE_OR_FOLDER",
                        help="an image, or a folder of images (local path or s3://)")
    parser.add_argument("--references", required=True, metavar="DIR_OR_DATASET",
                        help="a folder of normal images, or a residual-ad dataset (with --category: its "
                             "normal train images)")
    parser.add_argument("--category", help="dataset references: the category to take references from")
    parser.add_argument("--dataset", help="dataset references: the dataset, when several have the category")
    parser.add_argument("--k", type=int,
                        help="references to use (default: dataset index.shots[0], folder all its images)")
    parser.add_argument("--output", "-o", default="predictions",
                        help="where overlays and scores.csv go (default ./predictions)")
    parser.add_argument("--threshold", type=float,
                        help="image-score threshold: each image is also called anomalous or normal")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from workflows import storage
    from workflows.config import config_from_args
    from workflows.pipelines.predict import PredictOptions, run_predict

    config = config_from_args(args)
    options = PredictOptions(
        inputs=storage.absolute(args.input), references=storage.absolute(args.references),
        output=storage.absolute(args.output), category=args.category, dataset=args.dataset, k=args.k,
        threshold=args.threshold)
    result = run_predict(config, options)
    print(f"predict: {len(result.predictions)} image(s) against {result.references}; "
          f"{config.method.name} maps: {result.mode}")
    for p in result.predictions:
        verdict = "" if p.anomalous is None else f"\t{'anomalous' if p.anomalous else 'normal'}"
        print(f"{p.path}\t{p.score:.6g}{verdict}")
    print(f"overlays and {len(result.predictions)} score(s) -> {storage.redact(result.output)}")
    return 0
