"""`residual-ad lodo`: leave-one-dataset-out training + evaluation + summary, logged to MLflow."""

from __future__ import annotations

from workflows.config import add_config_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("lodo", help="leave-one-dataset-out protocol (train, evaluate, summary)")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from workflows.config import config_from_args
    from workflows.pipelines.lodo import run_lodo
    from workflows.pipelines.ray_runtime import init_ray
    from workflows.storage import redact
    from workflows.tracking import tracking_uri
    from workflows.validate import validate_run

    config = config_from_args(args)
    validate_run(config, "lodo")  # bad config or inputs: one line, exit 2, before Ray
    init_ray(config.ray_address)
    outcome = run_lodo(config)
    for fold in outcome.folds:
        train_on = ", ".join(fold.train_datasets) or "-"
        print(f"fold: hold out {fold.holdout} (group {fold.group}); train on {train_on}")
    print(outcome.markdown)
    print(f"summary: {redact(outcome.summary_url)}")
    if config.tracking.enabled and outcome.run_id:
        print(f"MLflow run {outcome.run_id} in {redact(tracking_uri())}")
    return 0
