"""`residual-ad log-results RUN_URL`: log results already on storage to MLflow, later.

When the tracking server is down at the end of a run, the results are still committed on storage;
this command logs them once it is back, from the stored files only (nothing is recomputed). It loads
them into the objects the commands log and calls the same `workflows.tracking` function, so a run logged
later has the params, metrics and artifacts the command would have logged:
- an evaluation job (`metrics.json` + `_SUCCESS`): one run with params, metrics, per-image results, reports;
- a scan output (`summary.json` + `_SUCCESS`): the scan run;
- a summary folder of `evaluate` (`evaluations/<timestamp>/`) or `lodo` (`lodo/<timestamp>/`): the parent
  run with the config and the summary tables, and a nested run per job listed in its `jobs.json`
  (a lodo folder from before `jobs.json`: the parent only);
- a training checkpoint (`train_log.json` + `_SUCCESS`): the training run (losses, contributions);
- an output root: every summary folder under `evaluations/` and `lodo/`, then every committed evaluation
  job under `evaluate/` and every checkpoint under `checkpoints/<method>/` that no folder lists.
A run logged this way is tagged `logged_from=<url>`; a URL is skipped when a run with that tag exists, or
a FINISHED run that the original command logged with it (`results_url` / `checkpoint` / `scan.output`
param), so logging an output root after a partly tracked run adds only what is missing (inside a summary
folder too: its jobs already logged are left out of the new parent). An MLflow error is this command's
error (one line, exit code 1).
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("log-results", help="log results stored on object storage to MLflow later")
    parser.add_argument("url", metavar="RUN_URL",
                        help="an evaluation job, a scan output, an evaluate or lodo summary folder, a "
                             "checkpoint, or a run's output root")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: the stored config's)")
    parser.add_argument("--force", action="store_true", help="log again even if already logged")
    parser.set_defaults(run=run)


def _kind(url: str) -> str | None:
    from workflows import storage
    from workflows.pipelines.summary_folder import is_summary_folder

    if storage.is_committed(url) and storage.exists(storage.join(url, "metrics.json")):
        return "evaluate"
    if storage.is_committed(url) and storage.exists(storage.join(url, "summary.json")):
        return "scan"
    if is_summary_folder(url):
        return "summary"
    if storage.is_committed(url) and storage.exists(storage.join(url, "train_log.json")):
        return "train"
    return None


def _config(url: str):
    from workflows import storage
    from workflows.config import RunConfig, load_config

    path = storage.join(url, "config.yaml")
    return load_config(path) if storage.exists(path) else RunConfig()


# the param under which the original command logged a result's URL, by kind
_URL_PARAMS = {"evaluate": "results_url", "summary": "results_url", "train": "checkpoint",
               "scan": "`scan.output`"}


def _already_logged(tracker, kind: str, url: str) -> bool:
    from workflows.storage import redact

    quoted = redact(url).replace("'", "\\'")
    if tracker.search_runs(f"tags.logged_from = '{quoted}'"):
        return True
    param = _URL_PARAMS.get(kind)
    finished = f"params.{param} = '{quoted}' and attributes.status = 'FINISHED'"
    return bool(param and tracker.search_runs(finished))


def log_train(tracker, url: str) -> None:
    """A committed checkpoint's training run (`tracking.log_train_run`)."""
    from workflows.pipelines.train import stored_train_identity, stored_train_result
    from workflows.tracking import log_train_run

    identity = stored_train_identity(url)
    context = {"backbone_identity": identity} if identity else {}
    log_train_run(tracker, stored_train_result(url), context=context, logged_from=True)


def log_evaluation(tracker, url: str) -> None:
    """A committed evaluation job as a top-level run (`tracking.log_evaluation_run`)."""
    from workflows.pipelines.evaluate import stored_eval_result
    from workflows.tracking import log_evaluation_run

    log_evaluation_run(tracker, stored_eval_result(url), context={"config": _config(url).to_dict()},
                       logged_from=True)


def log_summary(tracker, url: str, force: bool = False) -> None:
    """A summary folder's parent run with a nested run per listed job not already logged."""
    from workflows import storage
    from workflows.pipelines.summary_folder import load_summary_folder
    from workflows.tracking import log_summary_folder

    record = load_summary_folder(url)
    if not force:
        for kind, entries, url_of in (("evaluate", record.evaluations, lambda e: e.result.job_url),
                                      ("train", record.trainings, lambda e: e.result.checkpoint)):
            done = [e for e in entries if _already_logged(tracker, kind, url_of(e))]
            for entry in done:
                print(f"already logged: {storage.redact(url_of(entry))}")
                entries.remove(entry)
    log_summary_folder(tracker, record, logged_from=True)


def log_scan(tracker, url: str, config) -> None:
    """The same run `scan` logs, tagged with its URL."""
    from workflows import storage
    from workflows.tracking import log_scan_run

    summary = storage.read_json(storage.join(url, "summary.json"))
    log_scan_run(tracker, config.to_dict(), summary, logged_from=url)


def targets(url: str) -> list[tuple[str, str]]:
    """(kind, url) of everything loggable at `url` (itself, or the folders and jobs under an output root;
    jobs listed by a summary folder are logged inside it)."""
    from workflows import storage
    from workflows.pipelines.summary_folder import KIND_DIRS, listed_urls

    kind = _kind(url)
    if kind:
        return [(kind, url)]
    found, listed = [], set()
    for name in KIND_DIRS.values():
        for child in sorted(storage.list_urls(storage.join(url, name))):
            if _kind(child) == "summary":
                found.append(("summary", child))
                listed |= listed_urls(child)
    bases = [storage.join(url, "evaluate")]
    checkpoints = storage.join(url, "checkpoints")
    if storage.exists(checkpoints):
        bases += storage.list_urls(checkpoints)  # checkpoints/<method>/<key>
    for base in bases:
        for child in sorted(storage.list_urls(base)):
            child_kind = _kind(child)
            if child_kind and child.rstrip("/") not in listed:
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
        elif kind == "summary":
            log_summary(tracker, url, args.force)
        elif kind == "train":
            log_train(tracker, url)
        else:
            log_scan(tracker, url, config)
        logged += 1
        print(f"logged {kind}: {storage.redact(url)}")
    print(f"log-results: {logged} run(s) logged to MLflow")
    return 0
