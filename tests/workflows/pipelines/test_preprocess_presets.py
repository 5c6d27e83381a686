"""Every pipeline uses the method's preprocessing preset: banks are keyed by it, evaluate's scoring jobs
carry it and `prepare_shard` applies it to images and masks (no Ray: the Ray parts are stubbed)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from residual_core.images import decode_image, decode_mask
from residual_core.preprocess import get_preprocess
from workflows.config import MethodConfig, load_config
from workflows.datasets.writer import write_dataset
from workflows.pipelines import evaluate as evaluate_module
from workflows.pipelines.evaluate import EvalSpec, job_url_for, run_evaluations
from workflows.pipelines.index import BankRequest, plan_bank, read_images
from workflows.pipelines.models import method_preprocess, probe_backbone
from workflows.pipelines.prepared import PreparedShard, model_input
from workflows.pipelines.scoring import ScoringJob, prepare_shard

SIZE = 32
WIDTH, HEIGHT = 70, 40  # non-square: the presets' geometries differ


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _rows() -> list[dict]:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rows = []
    for i, (split, label) in enumerate([("train", 0), ("train", 0), ("test", 0), ("test", 1), ("test", 1)]):
        base = 120 + 90 * np.sin(x / (4.0 + i)) * np.cos(y / 6.0)
        image = np.clip(np.stack([base + rng.normal(0, 25, base.shape)] * 3, -1), 0, 255).astype(np.uint8)
        mask = None
        if label:
            mask_array = np.zeros((HEIGHT, WIDTH), np.uint8)
            mask_array[10:25, 5 + 20 * (i - 3):30 + 20 * (i - 3)] = 255  # one defect partly off-centre
            mask = _png(mask_array)
        rows.append({"dataset": "shapes", "category": "wide", "split": split, "label": label,
                     "defect_type": "blob" if label else "good", "image": _png(image), "mask": mask,
                     "width": WIDTH, "height": HEIGHT, "source": f"wide/{i}.png"})
    return rows


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("presets") / "data")
    write_dataset(_rows(), url)
    return url


def _config(tmp_path, data_url):
    return load_config(None, [f"data.url={data_url}", f"output={tmp_path / 'out'}",
                              f"backbone.image_size={SIZE}", "tracking.enabled=false",
                              "evaluate.stop_after_shards=10"])


def test_bank_key_and_job_key_depend_on_the_preset(tmp_path, data_url):
    config = _config(tmp_path, data_url)
    info = probe_backbone({"spec": "effnet-lite0", "layers": None, "image_size": SIZE})
    urls = {name: plan_bank(config, info, BankRequest("shapes", "wide", 1, 0, name)).url
            for name in ("res2clip", "resad", "torch-bicubic")}
    assert len(set(urls.values())) == 3  # never reused across presets
    again = plan_bank(config, info, BankRequest("shapes", "wide", 1, 0, "resad"))
    assert again.url == urls["resad"]  # and reused within one
    square = EvalSpec(("shapes",), MethodConfig("baseline"), 1, 0)
    crop = EvalSpec(("shapes",), MethodConfig("baseline", {"preprocess": "resad"}), 1, 0)
    assert job_url_for(config, square, info.identity_key) != job_url_for(config, crop, info.identity_key)


def test_read_images_uses_the_given_preset(data_url):
    info = probe_backbone({"spec": "effnet-lite0", "layers": None, "image_size": SIZE})
    rows = [r for r in _rows() if r["split"] == "train"]
    from workflows.datasets.schema import content_id

    ids = [content_id(r["image"]) for r in rows]
    for name in ("res2clip", "resad"):
        images = read_images(data_url, "shapes", "wide", "train", ids, info, name)
        preset = get_preprocess(name)
        expected = torch.stack([preset.image(decode_image(r["image"]), SIZE, info.mean, info.std)
                                for r in rows])
        assert torch.equal(images, expected)


def test_evaluate_jobs_carry_the_method_preset_and_prepare_shard_applies_it(tmp_path, data_url, monkeypatch):
    """Two methods in one evaluation (as lodo runs them): each job gets its method's preset and banks
    made with it; prepare_shard's images and masks equal that preset's on the stored bytes."""
    config = _config(tmp_path, data_url)
    info = probe_backbone({"spec": "effnet-lite0", "layers": None, "image_size": SIZE})
    requested, scored = [], []

    def fake_banks(config, requests, progress=True):
        requested.extend(requests)
        return {r: plan_bank(config, info, r) for r in requests}

    def fake_scoring(tasks, **kwargs):
        scored.extend(tasks)
        return []

    monkeypatch.setattr(evaluate_module, "ensure_banks", fake_banks)
    monkeypatch.setattr(evaluate_module, "run_scoring", fake_scoring)
    monkeypatch.setattr("workflows.pipelines.ray_runtime.actor_cpus", lambda num_actors: 1.0)
    monkeypatch.setattr("workflows.pipelines.ray_runtime.default_cpu_actors", lambda: 1)
    monkeypatch.setattr("workflows.pipelines.ray_runtime.cluster_gpus", lambda: 0.0)
    specs = [EvalSpec(("shapes",), MethodConfig("resadpp"), 1, 0),
             EvalSpec(("shapes",), MethodConfig("baseline"), 1, 0)]
    run_evaluations(config, specs, progress=False)
    assert {r.preprocess for r in requested} == {"resad", "res2clip"}
    jobs = {job.method["name"]: (job, shard) for job, shard in scored}
    assert jobs["resadpp"][0].preprocess == "resad" and jobs["baseline"][0].preprocess == "res2clip"
    assert jobs["resadpp"][0].banks != jobs["baseline"][0].banks  # banks differ with the preset
    assert ScoringJob.from_json(jobs["resadpp"][0].to_json()).preprocess == "resad"

    test_rows = sorted((r for r in _rows() if r["split"] == "test"), key=lambda r: r["source"])
    for name, (job, shard) in jobs.items():
        payload = _prepared(job, shard)
        preset = get_preprocess(method_preprocess(MethodConfig(name)))
        by_source = {r["source"]: r for r in test_rows}
        for i, kept in enumerate(payload.kept):
            row = by_source[kept["source"]]
            image = decode_image(row["image"])
            expected = preset.image(image, SIZE, info.mean, info.std)
            np.testing.assert_array_equal(model_input(payload.images[i], job.mean, job.std), expected)
            mask = decode_mask(row["mask"], image.size) if row["mask"] is not None else None
            np.testing.assert_array_equal(payload.masks[i], preset.mask(mask, SIZE)[0].numpy())
        assert any(m.any() for m in payload.masks)
    resad, square = (model_input(_prepared(*jobs[name]).images, info.mean, info.std)
                     for name in ("resadpp", "baseline"))
    assert (resad - square).abs().max() > 0.1  # centre crop vs whole image


def _prepared(job: ScoringJob, shard) -> PreparedShard:
    return PreparedShard.from_row(prepare_shard({"job": job.to_json(), "shard": json.dumps(shard.to_dict())}))


def test_row_stack_grows_and_keeps_only_the_rows_appended():
    from workflows.pipelines.prepared import RowStack

    rows = [np.full((2, 3), i, np.uint8) for i in range(5)]
    for capacity in (0, 2, 5, 8):  # grown from nothing, grown twice, exact, rows left unused
        stack = RowStack((2, 3), np.uint8, capacity)
        for row in rows:
            stack.append(row)
        array = stack.array()
        assert len(stack) == 5 and array.shape == (5, 2, 3)
        assert array.flags.c_contiguous and array.flags.owndata
        assert np.array_equal(array, np.stack(rows))
    assert RowStack((2, 3), np.float32, 4).array().shape == (0, 2, 3)
