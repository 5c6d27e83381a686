"""`residual-ad evaluate`: score the test split with a method x k x seed; metrics and per-image results."""

from __future__ import annotations

from workflows.config import add_config_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a method on the test split (Ray Data + actors)")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from dataclasses import asdict

    from workflows.config import config_from_args
    from workflows.pipelines.evaluate import METRIC_NAMES, run_evaluate
    from workflows.pipelines.models import probe_backbone
    from workflows.pipelines.ray_runtime import init_ray
    from workflows.pipelines.summary import summary_rows, to_markdown
    from workflows.reports.evaluation import log_evaluation_reports
    from workflows.tracking import Tracker, eval_metrics, log_results_table
    from workflows.validate import validate_run

    config = config_from_args(args)
    validate_run(config, "evaluate")  # bad config or inputs: one line, exit 2, before Ray
    init_ray(config.ray_address)
    results = run_evaluate(config)
    if any(not r.completed for r in results):
        print("stopped early (evaluate.stop_after_shards); rerun to resume")
        return 0
    # MLflow failing from here on: one warning naming the log-results command, the command still succeeds
    stored = results[0].job_url if len(results) == 1 else config.output
    tracker = Tracker(config.tracking.experiment, config.tracking.enabled, results_url=stored)
    info = probe_backbone(asdict(config.backbone))
    for result in results:
        spec = result.spec
        name = f"eval {'+'.join(spec.datasets)} {spec.method.name} k={spec.k_shot} seed={spec.seed}"
        with tracker.run(name, tags={"kind": "evaluate"}):
            tracker.params({"config": config.to_dict(), "k_shot": spec.k_shot, "seed": spec.seed,
                            "backbone_identity": info.identity, "results_url": result.job_url,
                            "reference_ids": result.reference_ids})
            tracker.metrics(eval_metrics(result.per_category, result.per_dataset, METRIC_NAMES))
            tracker.metrics({"images": result.counts["images"], "skipped_images": result.counts["skipped"]})
            log_results_table(tracker, result.job_url)
            log_evaluation_reports(tracker, result.job_url)  # curves/ and gallery/ PNGs
        print(f"{spec.method.name} k={spec.k_shot} seed={spec.seed}: {result.counts['images']} images, "
              f"{result.counts['skipped']} skipped -> {result.job_url}")
    print(to_markdown(summary_rows(results)))
    return 0
