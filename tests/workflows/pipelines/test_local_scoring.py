"""Local (no Ray) scoring against the evaluate pipeline it reuses:

- maps recomputed on the driver equal the maps the pipeline stored (baseline, and ResAD++ finished with
  the job's stored per-category constants);
- a gallery of a job whose lowest-scoring anomalies have no stored map shows those true extremes, with
  recomputed maps;
- `residual-ad predict` end to end (the CLI's in-process main) gives evaluate's scores for the same
  images and references, prints them, writes overlays and scores.csv.
"""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from tests.workflows.pipelines.tiny_data import EVAL_BASE, write_tiny  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.datasets.reader import read_table  # noqa: E402
from workflows.pipelines.commits import ShardStore  # noqa: E402
from workflows.pipelines.evaluate import run_evaluate  # noqa: E402
from workflows.pipelines.local_scoring import MODE_SET_CONSTANTS, LocalScorer  # noqa: E402
from workflows.pipelines.shards import read_shard  # noqa: E402
from workflows.reports import job_outputs  # noqa: E402
from workflows.reports.evaluation import write_evaluation_reports  # noqa: E402
from workflows.reports.job_maps import RECOMPUTED, STORED, recompute_maps, scoring_job  # noqa: E402
from workflows.reports.selection import HIGH_NORMALS, LOW_ANOMALIES  # noqa: E402

TOLERANCE = 1e-5
PER_GROUP = 2
RESADPP = ('method={"name": "resadpp", "params": {"num_embeddings": 16, "coupling_layers": 2, '
           '"pos_embed_dim": 16}}')


def _config(root, name: str, *extra: str):
    return load_config(None, [*EVAL_BASE, f"data.url={root / 'data'}", f"output={root / name}",
                              "evaluate.shard_size=4", "evaluate.save_maps=all", "evaluate.map_dtype=float32",
                              *extra])


def _stored_maps(job_url: str) -> dict[str, np.ndarray]:
    maps = {}
    for shards in job_outputs.shards_by_category(job_url).values():
        for shard in shards:
            maps.update(job_outputs.load_maps(job_url, shard.shard_id,
                                              job_outputs.stored_map_ids(job_url, shard.shard_id)))
    return maps


def _assert_recomputed_equal_stored(job_url: str) -> str:
    """Recompute every image's map of the job on the driver; compare with the stored ones; the mode."""
    stored = _stored_maps(job_url)
    scorer = LocalScorer(scoring_job(job_url))
    compared = 0
    for shards in job_outputs.shards_by_category(job_url).values():
        for shard in shards:
            ids = job_outputs.stored_map_ids(job_url, shard.shard_id)
            for image_id, value in recompute_maps(scorer, job_url, shard, ids).items():
                np.testing.assert_allclose(value, stored[image_id], rtol=0, atol=TOLERANCE)
                compared += 1
    assert compared == len(stored) > 0
    return scorer.job.method["name"]


@pytest.fixture(scope="module")
def baseline_job(local_ray, tmp_path_factory):
    """A baseline evaluation of the tiny data (every map stored, float32)."""
    root = tmp_path_factory.mktemp("local-scoring")
    write_tiny(str(root / "data"))
    (result,) = run_evaluate(_config(root, "out"), progress=False)
    return root, result.job_url


def test_recomputed_maps_equal_the_pipeline_maps(baseline_job):
    _, job_url = baseline_job
    assert _assert_recomputed_equal_stored(job_url) == "baseline"


def test_resadpp_maps_are_finished_with_the_jobs_constants(baseline_job):
    root, _ = baseline_job
    (result,) = run_evaluate(_config(root, "resadpp", RESADPP, "data.datasets=[textures]",
                                     "data.categories=[brick]", "evaluate.batch_size=3"), progress=False)
    assert _assert_recomputed_equal_stored(result.job_url) == "resadpp"
    job = scoring_job(result.job_url)
    shard = job_outputs.shards_by_category(result.job_url)["textures/brick"][0]
    scorer = LocalScorer(job)
    assert scorer.method.set_normaliser() is not None
    ids = sorted(job_outputs.stored_map_ids(result.job_url, shard.shard_id))
    # without the constants (predict's mode) the maps differ: the constants are what makes them equal
    rows = [r for r in read_shard(shard, columns=("image_id", "image")).to_pylist()
            if r["image_id"] in ids]
    from residual_core.images import decode_image

    images = scorer.prepare([decode_image(r["image"]) for r in rows])
    bank = scorer.load_bank(job.banks["textures/brick"])
    record = storage.read_json(ShardStore(result.job_url).reduced_url("textures", "brick"))
    assert scorer.score(images, bank, set_record=record).mode == MODE_SET_CONSTANTS
    assert not np.allclose(scorer.score(images, bank).maps, _stored_maps(result.job_url)[rows[0]["image_id"]])


def _drop_stored_maps(job_url: str, image_ids: set[str]) -> None:
    """Rewrite the job's map archives without `image_ids` (as if `save_maps=sample` had missed them)."""
    store = ShardStore(job_url)
    for shards in job_outputs.shards_by_category(job_url).values():
        for shard in shards:
            url = storage.join(job_url, "maps", f"{shard.shard_id}.npz")
            kept = {k: v for k, v in store.read_npz(url).items() if k not in image_ids}
            store.write_npz(url, kept)


def test_gallery_shows_the_true_lowest_anomalies_with_recomputed_maps(baseline_job, tmp_path):
    import shutil

    root, job_url = baseline_job
    copy = str(tmp_path / "job")
    shutil.copytree(job_url, copy)
    results = ShardStore(copy).read_results().to_pylist()
    brick = [r for r in results if r["category"] == "brick" and r["status"] == "scored"]
    lowest = [r["image_id"] for r in sorted((r for r in brick if r["label"] == 1),
                                            key=lambda r: (r["image_score"], r["image_id"]))[:PER_GROUP]]
    highest = [r["image_id"] for r in sorted((r for r in brick if r["label"] == 0),
                                             key=lambda r: (-r["image_score"], r["image_id"]))[:PER_GROUP]]
    _drop_stored_maps(copy, set(lowest))
    written = write_evaluation_reports(copy, str(tmp_path / "reports"), per_group=PER_GROUP)
    reports = {r.name: r for r in written}
    report = reports["textures/brick"]
    assert report.gallery_images[LOW_ANOMALIES] == lowest
    assert report.gallery_images[HIGH_NORMALS] == highest
    assert all(report.map_sources[i] == RECOMPUTED for i in lowest)
    shown = {i for ids in report.gallery_images.values() for i in ids}
    assert report.map_sources == {i: RECOMPUTED if i in lowest else STORED for i in shown}
    assert os.path.getsize(report.files["gallery/brick.png"]) > 10_000
    if os.environ.get("RESIDUAL_AD_KEEP_PNG"):  # for looking at the pictures by hand
        shutil.copy(report.files["gallery/brick.png"], os.environ["RESIDUAL_AD_KEEP_PNG"])


def test_predict_gives_evaluates_scores(baseline_job, tmp_path, capsys):
    from workflows.cli import main

    root, job_url = baseline_job
    data = str(root / "data")
    table = read_table(data, columns=["image_id", "image"],
                       filters=[("dataset", "==", "textures"), ("category", "==", "brick"),
                                ("split", "==", "test")])
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id, image in zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True):
        (folder / f"{image_id}.png").write_bytes(image)
    out = tmp_path / "predicted"
    sets = [item for override in EVAL_BASE for item in ("--set", override)]
    code = main(["predict", str(folder), "--references", data, "--category", "brick", "--output", str(out),
                 "--threshold", "1.0", *sets])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    evaluated = {r["image_id"]: r["image_score"] for r in ShardStore(job_url).read_results().to_pylist()}
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["image_id"] for r in rows) == sorted(table["image_id"].to_pylist())
    for row in rows:
        assert float(row["score"]) == pytest.approx(evaluated[row["image_id"]], abs=TOLERANCE)
        assert row["anomalous"] == str(int(float(row["score"]) >= 1.0))
        assert (out / row["overlay"]).stat().st_size > 5_000
        line = next(line for line in printed if line.startswith(row["path"]))
        assert line.split("\t")[2] in ("anomalous", "normal")
        assert float(line.split("\t")[1]) == pytest.approx(float(row["score"]), rel=1e-5)
    assert "1 normal train image(s) of textures/brick" in printed[0]
    assert len(list(io.StringIO("\n".join(printed)))) == len(rows) + 2


def test_gallery_of_a_job_without_stored_maps_recomputes_every_map(baseline_job, tmp_path):
    """`evaluate.save_maps=none` (the default): every tile's map is recomputed."""
    import shutil

    _, job_url = baseline_job
    copy = str(tmp_path / "job")
    shutil.copytree(job_url, copy)
    shutil.rmtree(os.path.join(copy, "maps"))
    written = write_evaluation_reports(copy, str(tmp_path / "reports"), per_group=PER_GROUP)
    for report in written:
        shown = {i for ids in report.gallery_images.values() for i in ids}
        assert shown and report.map_sources == dict.fromkeys(shown, RECOMPUTED), report.name
