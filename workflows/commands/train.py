"""`residual-ad train`: fit a method's learnable parts on auxiliary datasets (one Ray task per job)."""

from __future__ import annotations

from workflows.config import add_config_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train a method on auxiliary datasets")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from dataclasses import asdict

    from workflows.config import config_from_args
    from workflows.pipelines.models import probe_backbone
    from workflows.pipelines.ray_runtime import init_ray
    from workflows.pipelines.train import run_train, train_spec
    from workflows.tracking import Tracker, live_train_run, log_train_run
    from workflows.validate import validate_run

    config = config_from_args(args)
    validate_run(config, "train")  # bad config or inputs: one line, exit 2, before Ray
    init_ray(config.ray_address)
    info = probe_backbone(asdict(config.backbone))
    tracker = Tracker(config.tracking.experiment, config.tracking.enabled, results_url=config.output)
    # the run is open while training runs: every step's losses reach MLflow as the task streams them
    with live_train_run(tracker, train_spec(config)) as log_steps:
        [result] = run_train(config, on_steps=lambda _spec, steps: log_steps(steps))
        tracker.results_url = result.checkpoint
        context = {"config": config.to_dict(), "backbone_identity": info.identity}
        log_train_run(tracker, result, context=context, live=True)
    print(f"checkpoint: {result.checkpoint}{' (reused)' if result.reused else ''}")
    for dataset, entry in sorted(result.contributions.items()):
        pool = entry.get("train_normal_images", 0)
        pool_text = f" + {pool} normal train images" if pool else ""
        print(f"  {dataset}: {entry['images']} test images{pool_text} in {len(entry['categories'])} "
              f"categories, {entry['used_for']}")
    return 0
