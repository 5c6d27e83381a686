"""evaluate + index end to end on a tiny local dataset: skipped images, resume, 1 vs 2 actors, batch sizes."""

from __future__ import annotations

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from tests.workflows.pipelines.tiny_data import EVAL_BASE, write_tiny  # noqa: E402
from workflows.cli import main  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.pipelines.commits import ShardStore  # noqa: E402
from workflows.pipelines.evaluate import run_evaluate  # noqa: E402
from workflows.pipelines.index import run_index  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny") / "data"), corrupt=1)


def _config(tmp_path, data, name, *extra):
    return load_config(None, [*EVAL_BASE, f"data.url={data}", f"output={tmp_path / name}", *extra])


def _results(result):
    return ShardStore(result.job_url).read_results().to_pylist()


def test_evaluate_command_records_skipped_and_metrics(local_ray, tiny_data, tmp_path, capsys):
    args = [f"--set={item}" for item in [*EVAL_BASE, f"data.url={tiny_data}", f"output={tmp_path / 'cli'}",
                                          "evaluate.shard_size=4", "evaluate.save_maps=all"]]
    assert main(["evaluate", *args]) == 0
    printed = capsys.readouterr().out
    assert "1 skipped" in printed and "| textures | baseline | 1 |" in printed
    # index reuses the banks evaluate built (content-addressed): nothing new to build
    config = _config(tmp_path, tiny_data, "cli")
    plans = run_index(config)
    assert len(plans) == 3 and all(p.url.startswith(str(tmp_path / "cli")) for p in plans.values())
    evaluated = run_evaluate(_config(tmp_path, tiny_data, "cli", "evaluate.shard_size=4",
                                     "evaluate.save_maps=all"), progress=False)[0]
    rows = _results(evaluated)
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert len(skipped) == 1 and "ImageDecodeError" in skipped[0]["skip_reason"]
    assert evaluated.counts == {"images": 18, "skipped": 1, "shards": evaluated.counts["shards"]}
    assert evaluated.per_dataset["labels"]["P-AUROC"] is None  # no masks: not defined, not zero
    assert "no " in evaluated.per_category["labels/camera"]["not_defined"]["P-AUROC"]
    assert 0.0 <= evaluated.per_dataset["textures"]["I-AUROC"] <= 1.0
    assert ShardStore(evaluated.job_url).done_ids()  # and anomaly maps were kept for every image
    from workflows import storage

    assert storage.list_urls(storage.join(evaluated.job_url, "maps"))


def test_resume_and_independence_of_actors_batch_and_shards(local_ray, tiny_data, tmp_path):
    interrupted = _config(tmp_path, tiny_data, "resume", "evaluate.shard_size=2",
                          "evaluate.stop_after_shards=3")
    (partial,) = run_evaluate(interrupted, progress=False)
    assert not partial.completed and len(ShardStore(partial.job_url).done_ids()) == 3
    (resumed,) = run_evaluate(_config(tmp_path, tiny_data, "resume", "evaluate.shard_size=2"), progress=False)
    assert resumed.resumed_shards == 3 and resumed.completed

    (other,) = run_evaluate(_config(tmp_path, tiny_data, "other", "evaluate.shard_size=5",
                                    "evaluate.num_actors=2", "evaluate.batch_size=1"), progress=False)
    first, second = _results(resumed), _results(other)
    ids = [r["image_id"] for r in first]
    assert len(ids) == len(set(ids)) == 19  # no duplicates after the resume (18 scored + 1 skipped)
    assert ids == [r["image_id"] for r in second]
    # equal up to float rounding of batched convolutions (~1e-6 relative)
    first_scores = [r["image_score"] or 0 for r in first]
    np.testing.assert_allclose(first_scores, [r["image_score"] or 0 for r in second], rtol=1e-4, atol=1e-5)
    for name, metrics in resumed.per_category.items():
        for metric, value in metrics.items():
            if isinstance(value, float):
                assert value == pytest.approx(other.per_category[name][metric], abs=1e-4), (name, metric)
