"""`residual-ad evaluate`: score the test split with a method x k x seed; metrics and per-image results.

Each (k, seed) is one job under `<output>/evaluate/<key>/`; the command then writes the summary folder
`<output>/evaluations/<timestamp>/` (`config.yaml`, `summary.csv`, `summary.md`: mean ± std over seeds;
`jobs.json`) and logs one parent MLflow run with a nested run per job (`workflows.tracking`).
"""

from __future__ import annotations

from workflows.config import add_config_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("evaluate", help="evaluate a method on the test split (Ray Data + actors)")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from dataclasses import asdict

    from workflows.config import config_from_args
    from workflows.pipelines.evaluate import run_evaluate
    from workflows.pipelines.models import probe_backbone
    from workflows.pipelines.ray_runtime import init_ray
    from workflows.pipelines.summary_folder import evaluate_record, write_summary_folder
    from workflows.storage import redact
    from workflows.tracking import Tracker, log_evaluate_parent
    from workflows.validate import validate_run

    config = config_from_args(args)
    validate_run(config, "evaluate")  # bad config or inputs: one line, exit 2, before Ray
    init_ray(config.ray_address)
    results = run_evaluate(config)
    if any(not r.completed for r in results):
        print("stopped early (evaluate.stop_after_shards); rerun to resume")
        return 0
    record = evaluate_record(config, results, probe_backbone(asdict(config.backbone)).identity)
    write_summary_folder(record, config)
    # MLflow failing from here on: one warning naming the log-results command, the command still succeeds
    tracker = Tracker(config.tracking.experiment, config.tracking.enabled, results_url=record.url)
    log_evaluate_parent(tracker, record)
    for result in results:
        spec = result.spec
        print(f"{spec.method.name} k={spec.k_shot} seed={spec.seed}: {result.counts['images']} images, "
              f"{result.counts['skipped']} skipped -> {result.job_url}")
    print(record.tables["summary.md"], end="")
    print(f"summary: {redact(record.url)}")
    if "defect_types.md" in record.tables:
        print(f"per defect type: {redact(record.url)}/defect_types.md")
    return 0
