"""`residual-ad index`: build (or reuse) reference banks for every category x k x seed."""

from __future__ import annotations

from workflows.config import add_config_arguments


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("index", help="build reference banks and FAISS indexes (Ray tasks)")
    add_config_arguments(parser)
    parser.set_defaults(run=run)


def run(args) -> int:
    from workflows.config import config_from_args
    from workflows.pipelines.index import run_index
    from workflows.pipelines.ray_runtime import init_ray
    from workflows.validate import validate_run

    config = config_from_args(args)
    validate_run(config, "index")  # bad config or inputs: one line, exit 2, before Ray
    init_ray(config.ray_address)
    plans = run_index(config)
    for request, plan in sorted(plans.items(), key=lambda item: str(item[0])):
        print(f"{request.dataset}/{request.category} k={request.k_shot} seed={request.seed}: {plan.url}")
    print(f"{len(plans)} bank(s) ready")
    return 0
