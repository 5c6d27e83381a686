"""Summary folders without Ray or MLflow: what `evaluate` writes, what `log-results` loads back (the same
record), further tables through `SUMMARY_TABLES`, and what an output root lists."""

from __future__ import annotations

from workflows import storage
from workflows.commands.log_results import targets
from workflows.config import DataConfig, MethodConfig, RunConfig
from workflows.pipelines import summary_folder
from workflows.pipelines.evaluate import EvalResult, EvalSpec
from workflows.pipelines.summary_folder import (
    evaluate_record,
    listed_urls,
    load_summary_folder,
    write_summary_folder,
)

IDENTITY = {"name": "effnet-lite0", "weights_sha256": "", "layers": [1, 2], "image_size": 64}


def _job(output: str, seed: int, auroc: float) -> EvalResult:
    """A committed evaluation job with its metrics.json, as `evaluate` leaves it."""
    spec = EvalSpec(("textures",), MethodConfig("baseline"), 1, seed)
    per_category = {"textures/brick": {"I-AUROC": auroc, "P-AUROC": None}}
    result = EvalResult(spec, storage.join(output, "evaluate", f"job{seed}"), per_category,
                        {"textures": {"I-AUROC": auroc}}, {"images": 6, "skipped": 0, "shards": 1},
                        {"textures/brick": ["a", "b"]})
    payload = {key: value for key, value in result.to_dict().items() if key != "job_url"}
    storage.atomic_write_json(storage.join(result.job_url, "metrics.json"), payload)
    storage.mark_success(result.job_url, {"metrics": "metrics.json"})
    return result


def _record(tmp_path):
    config = RunConfig(output=str(tmp_path / "out"), data=DataConfig(url=str(tmp_path / "data")))
    results = [_job(config.output, 0, 0.75), _job(config.output, 1, 0.25)]
    return config, results, evaluate_record(config, results, IDENTITY)


def test_written_folder_loads_back_as_the_same_record(tmp_path):
    config, results, record = _record(tmp_path)
    write_summary_folder(record, config)
    assert record.url.startswith(storage.join(config.output, "evaluations"))
    assert record.name == "evaluate textures baseline"
    assert "| textures | baseline | 1 | 2 | 50.0 ± 35.4 |" in record.tables["summary.md"]
    loaded = load_summary_folder(record.url)
    assert (loaded.kind, loaded.name, loaded.params, loaded.tables) == (
        record.kind, record.name, record.params, record.tables)
    assert loaded.config == record.config
    assert [e.result.to_dict() for e in loaded.evaluations] == [
        {**r.to_dict(), "resumed_shards": 1} for r in results]
    assert [e.params for e in loaded.evaluations] == [{"backbone_identity": IDENTITY}] * 2
    assert loaded.rows == record.rows


def test_summaries_made_in_one_second_get_their_own_folders(tmp_path):
    config, _, first = _record(tmp_path)
    second = evaluate_record(config, [], IDENTITY)
    assert first.url != second.url
    parent = storage.join(config.output, "evaluations")
    assert {u.rsplit("/", 1)[0] for u in (first.url, second.url)} == {parent}


def test_further_tables_are_written_and_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(summary_folder, "SUMMARY_TABLES", [
        *summary_folder.SUMMARY_TABLES, lambda results: {"per_seed.csv": f"{len(results)} jobs\n"}])
    config, _, record = _record(tmp_path)
    write_summary_folder(record, config)
    assert storage.read_bytes(storage.join(record.url, "per_seed.csv")) == b"2 jobs\n"
    assert load_summary_folder(record.url).tables["per_seed.csv"] == "2 jobs\n"


def test_output_root_logs_folders_with_their_jobs_and_unlisted_jobs_alone(tmp_path):
    config, results, record = _record(tmp_path)
    write_summary_folder(record, config)
    stray = _job(config.output, 7, 0.5)  # e.g. from an evaluate run that stopped before its summary
    assert listed_urls(record.url) == {r.job_url for r in results}
    assert targets(config.output) == [("summary", record.url), ("evaluate", stray.job_url)]
    assert targets(record.url) == [("summary", record.url)]


def test_lodo_folder_from_before_jobs_json_is_the_parent_alone(tmp_path):
    folder = str(tmp_path / "out" / "lodo" / "20260101-000000")
    storage.atomic_write_bytes(storage.join(folder, "summary.csv"), b"dataset\n")
    storage.atomic_write_bytes(storage.join(folder, "summary.md"), b"| dataset |\n")
    loaded = load_summary_folder(folder)
    assert (loaded.kind, loaded.name, loaded.evaluations) == ("lodo", "lodo 20260101-000000", [])
    assert loaded.tables == {"summary.csv": "dataset\n", "summary.md": "| dataset |\n"}
    assert targets(str(tmp_path / "out")) == [("summary", folder)]
