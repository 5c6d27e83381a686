"""`residual-ad log-results RUN_URL`: log results already on storage to MLflow, later.

When the tracking server is down at the end of a run, the results are still committed on storage;
this command logs them once it is back, from the stored files only (nothing is recomputed):
- an evaluation job (`metrics.json` + `_SUCCESS`): one run with params, metrics, per-image results;
- a scan output (`summary.json` + `_SUCCESS`): the scan run;
- a lodo run folder (`summary.csv`): a parent run with the config and the summary table;
- a training checkpoint (`train_log.json` + `_SUCCESS`): the training run (losses, contributions);
- an output root: every committed evaluation job under `evaluate/`, every lodo folder under `lodo/` and
  every checkpoint under `checkpoints/<method>/`.
A run logged this way is tagged `logged_from=<url>`; a URL is skipped when a run with that tag exists, or
a FINISHED run that the original command logged with it (`results_url` / `checkpoint` / `scan.output`
param), so logging an output root after a partly tracked run adds only what is missing. An MLflow error
is this command's error (one line, exit code 1).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("log-results", help="log results stored on object storage to MLflow later")
    parser.add_argument("url", metavar="RUN_URL",
                        help="an evaluation job, a scan output, a lodo run folder, or a run's output root")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the stored config's)")
    parser.add_argument("--force", action="store_true", help="log again even if already logged")
    parser.set_defaults(run=run)


def _kind(url: str) -> str | None:
    from workflows import storage

    if storage.is_committed(url) and storage.exists(storage.join(url, "metrics.json")):
        return "evaluate"
    if storage.is_committed(url) and storage.exists(storage.join(url, "summary.json")):
        return "scan"
    if storage.exists(storage.join(url, "summary.csv")):
        return "lodo"
    if storage.is_committed(url) and storage.exists(storage.join(url, "train_log.json")):
        return "train"
    return None


def _config(url: str):
    from workflows import storage
    from workflows.config import RunConfig, load_config

    path = storage.join(url, "config.yaml")
    return load_config(path) if storage.exists(path) else RunConfig()


# the param under which the original command logged a result's URL, by kind
_URL_PARAMS = {"evaluate": "results_url", "train": "checkpoint", "scan": "`scan.output`"}


def _already_logged(tracker, kind: str, url: str) -> bool:
    from workflows.storage import redact

    quoted = redact(url).replace("'", "\\'")
    if tracker.search_runs(f"tags.logged_from = '{quoted}'"):
        return True
    param = _URL_PARAMS.get(kind)
    finished = f"params.{param} = '{quoted}' and attributes.status = 'FINISHED'"
    return bool(param and tracker.search_runs(finished))


def log_train(tracker, url: str) -> None:
    """A committed checkpoint's training run, from its stored log (losses, contributions, references)."""
    from workflows import storage
    from workflows.pipelines.train import LOG_NAME

    log = storage.read_json(storage.join(url, LOG_NAME))
    marker = storage.read_json(storage.join(url, storage.SUCCESS_MARKER))
    with tracker.run(f"train {marker.get('method', '?')} seed={marker.get('seed')}",
                     tags={"kind": "train", "logged_from": storage.redact(url)}):
        tracker.params({"checkpoint": url, **marker})
        tracker.loss_history([(int(step), values) for step, values in log.get("losses", [])])
        tracker.json(log.get("contributions", {}), "contributions.json")
        tracker.json(log.get("reference_ids", {}), "reference_ids.json")


def log_evaluation(tracker, url: str) -> None:
    from workflows import storage
    from workflows.pipelines.evaluate import METRIC_NAMES
    from workflows.tracking import eval_metrics, log_results_table

    saved = storage.read_json(storage.join(url, "metrics.json"))
    spec = saved.get("spec", {})
    name = f"eval {'+'.join(spec.get('datasets', []))} {spec.get('method', {}).get('name', '?')} " \
           f"k={spec.get('k_shot')} seed={spec.get('seed')}"
    with tracker.run(name, tags={"kind": "evaluate", "logged_from": storage.redact(url)}):
        tracker.params({"config": _config(url).to_dict(), "spec": spec, "results_url": url,
                        "reference_ids": saved.get("reference_ids", {})})
        tracker.metrics(eval_metrics(saved["per_category"], saved["per_dataset"], METRIC_NAMES))
        counts = saved.get("counts", {})
        tracker.metrics({"images": counts.get("images"), "skipped_images": counts.get("skipped")})
        tracker.json(saved, "metrics.json")
        log_results_table(tracker, url)


def log_lodo(tracker, url: str) -> None:
    from workflows import storage

    with tracker.run(f"lodo {url.rstrip('/').rsplit('/', 1)[-1]}",
                     tags={"kind": "lodo", "logged_from": storage.redact(url)}):
        tracker.params({"config": _config(url).to_dict(), "results_url": url})
        for name in ("summary.csv", "summary.md"):
            target = storage.join(url, name)
            if storage.exists(target):
                tracker.text(storage.read_bytes(target).decode(), name)


def log_scan(tracker, url: str, config) -> None:
    """The same run `scan` logs, tagged with its URL."""
    from workflows import storage
    from workflows.commands.scan import log_summary

    summary = storage.read_json(storage.join(url, "summary.json"))
    log_summary(tracker, config, summary, tags={"logged_from": storage.redact(url)})


def targets(url: str) -> list[tuple[str, str]]:
    """(kind, url) of everything loggable at `url` (itself, or the jobs and runs under an output root)."""
    from workflows import storage

    kind = _kind(url)
    if kind:
        return [(kind, url)]
    found = []
    bases = [storage.join(url, "evaluate"), storage.join(url, "lodo")]
    checkpoints = storage.join(url, "checkpoints")
    if storage.exists(checkpoints):
        bases += storage.list_urls(checkpoints)  # checkpoints/<method>/<key>
    for base in bases:
        if not storage.exists(base):
            continue
        for child in sorted(storage.list_urls(base)):
            child_kind = _kind(child)
            if child_kind:
                found.append((child_kind, child))
    return found


def run(args) -> int:
    from workflows import storage
    from workflows.tracking import Tracker

    found = targets(args.url)
    if not found:
        print(f"log-results: nothing committed to log at {storage.redact(args.url)}")
        return 2
    logged = 0
    for kind, url in found:
        config = _config(url)
        tracker = Tracker(args.experiment or config.tracking.experiment, True, required=True)
        if not args.force and _already_logged(tracker, kind, url):
            print(f"already logged: {storage.redact(url)}")
            continue
        if kind == "evaluate":
            log_evaluation(tracker, url)
        elif kind == "lodo":
            log_lodo(tracker, url)
        elif kind == "train":
            log_train(tracker, url)
        else:
            log_scan(tracker, url, config)
        logged += 1
        print(f"logged {kind}: {storage.redact(url)}")
    print(f"log-results: {logged} run(s) logged to MLflow")
    return 0
