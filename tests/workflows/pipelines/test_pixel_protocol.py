"""The field's evaluation protocol through the evaluate pipeline.

- Pixel metrics count every test image of a category with pixel ground truth (normal images as all-zero
  masks); recomputed here with scikit-learn and an exact AUPRO from the saved float32 maps.
- ResAD++'s default normalisation (per-level maximum over the evaluated set) is finished per category
  after scoring; its per-image scores equal the in-memory computation over the whole set.
- Per defect type (the tiny data has two): that type's images against the category's normals, through
  the scoring actor and through the set reduce.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from tests.residual_core.metrics.references import exact_aupro, sklearn_metrics  # noqa: E402
from tests.workflows.pipelines.tiny_data import EVAL_BASE, TINY_LAYOUT, tiny_rows  # noqa: E402
from workflows import storage  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.datasets.reader import pixel_ground_truth, read_table  # noqa: E402
from workflows.datasets.writer import write_dataset  # noqa: E402
from workflows.pipelines.commits import ShardStore  # noqa: E402
from workflows.pipelines.evaluate import NO_PIXEL_TRUTH, run_evaluate  # noqa: E402

# a small untrained ResAD++ (the normalisation, not the training, is under test)
RESADPP = ('method={"name": "resadpp", "params": {"num_embeddings": 16, "coupling_layers": 2, '
           '"pos_embed_dim": 16}}')


@pytest.fixture(scope="module")
def data_url(tmp_path_factory):
    """The tiny dataset, plus one anomalous textures/brick image without its mask."""
    rows = tiny_rows()
    unmasked = next(r for r in rows if r["category"] == "brick" and r["split"] == "test" and r["label"] == 1)
    unmasked["mask"] = None
    url = str(tmp_path_factory.mktemp("protocol") / "data")
    write_dataset(rows, url, extra_metadata={"source_groups": {d: s[0] for d, s in TINY_LAYOUT.items()}})
    return url


def _config(tmp_path, data, name, *extra):
    return load_config(None, [*EVAL_BASE, f"data.url={data}", f"output={tmp_path / name}", *extra])


def _test_rows(data_url: str, dataset: str, category: str) -> dict[str, dict]:
    table = read_table(data_url, columns=["image_id", "label", "image", "mask"],
                       filters=[("dataset", "==", dataset), ("category", "==", category),
                                ("split", "==", "test")])
    return {r["image_id"]: r for r in table.to_pylist()}


def _mask(row: dict, size: int, preprocess: str) -> np.ndarray:
    """The row's mask as the pipeline scores it (the method's preset); all zeros for a normal image."""
    from residual_core.images import decode_image, decode_mask
    from residual_core.preprocess import get_preprocess

    mask = decode_mask(row["mask"], decode_image(row["image"]).size) if row["mask"] is not None else None
    return get_preprocess(preprocess).mask(mask, size)[0].numpy() > 0.5


def _maps(job_url: str) -> dict[str, np.ndarray]:
    store = ShardStore(job_url)
    maps = {}
    for url in storage.list_urls(storage.join(job_url, "maps")):
        with np.load(io.BytesIO(storage.read_bytes(url))) as data:
            maps.update({key: data[key] for key in data.files})
    assert store.done_ids()
    return maps


def test_manifest_records_pixel_ground_truth(data_url):
    flags = pixel_ground_truth(data_url)
    assert flags[("textures", "brick")] and flags[("photos", "coffee")]
    assert flags[("labels", "camera")] is False


def test_pixel_metrics_count_normal_images_as_zero_masks(local_ray, data_url, tmp_path):
    (result,) = run_evaluate(_config(tmp_path, data_url, "baseline", "evaluate.shard_size=4",
                                     "evaluate.save_maps=all", "evaluate.map_dtype=float32"), progress=False)
    maps = _maps(result.job_url)
    scores = {r["image_id"]: r["image_score"] for r in ShardStore(result.job_url).read_results().to_pylist()}
    for category in ("brick", "grass"):
        rows = _test_rows(data_url, "textures", category)
        ids = sorted(rows)
        labels = np.array([rows[i]["label"] for i in ids])
        # pixel protocol: normal images (zero masks) and anomalous images with a mask; not the unmasked one
        pixel_ids = [i for i in ids if rows[i]["label"] == 0 or rows[i]["mask"] is not None]
        stack = np.stack([maps[i] for i in pixel_ids]).astype(np.float32)
        masks = np.stack([_mask(rows[i], stack.shape[-1], "res2clip") for i in pixel_ids])  # the baseline's
        metrics = result.per_category[f"textures/{category}"]
        p_auroc, p_ap, p_f1 = sklearn_metrics(masks, stack)
        i_auroc, i_ap, i_f1 = sklearn_metrics(labels, np.array([scores[i] for i in ids], np.float32))
        expected = {"P-AUROC": p_auroc, "P-AP": p_ap, "P-F1max": p_f1, "AUPRO@0.3": exact_aupro(stack, masks),
                    "I-AUROC": i_auroc, "I-AP": i_ap, "I-F1max": i_f1}
        for name, value in expected.items():
            assert metrics[name] == pytest.approx(value, abs=1e-6), (category, name)
        normal_count = int((labels == 0).sum())
        assert metrics["counts"]["images_without_mask"] == (1 if category == "brick" else 0)
        assert metrics["counts"]["pixels"] == len(pixel_ids) * stack.shape[-1] ** 2
        assert normal_count > 0 and len(pixel_ids) == len(ids) - (1 if category == "brick" else 0)
    camera = result.per_category["labels/camera"]
    assert camera["P-AUROC"] is None and camera["not_defined"]["P-AUROC"] == NO_PIXEL_TRUTH
    assert camera["I-AUROC"] is not None
    _check_per_defect_type(result, data_url, maps, scores)


def _check_per_defect_type(result, data_url, maps, scores):
    """Each defect type's metrics = that type's images against the category's normals, recomputed
    with scikit-learn from the saved maps; kept in metrics.json."""
    assert set(result.per_defect_type) == set(result.per_category)
    for name, by_type in result.per_defect_type.items():
        dataset, category = name.split("/")
        rows = _test_rows(data_url, dataset, category)
        types = {i: r["defect_type"] for i, r in _typed_rows(data_url, dataset, category).items()}
        present = {types[i] for i in rows if rows[i]["label"] == 1}
        assert sorted(by_type) == sorted(present) == ["bright", "dark"]
        for defect, metrics in by_type.items():
            ids = sorted(i for i in rows if rows[i]["label"] == 0 or types[i] == defect)
            labels = np.array([rows[i]["label"] for i in ids])
            i_auroc, i_ap, _ = sklearn_metrics(labels, np.array([scores[i] for i in ids], np.float32))
            assert metrics["I-AUROC"] == pytest.approx(i_auroc, abs=1e-6), (name, defect)
            assert metrics["I-AP"] == pytest.approx(i_ap, abs=1e-6), (name, defect)
            assert metrics["counts"]["images"] == len(ids)
            if dataset == "labels":
                assert metrics["P-AUROC"] is None and metrics["not_defined"]["P-AUROC"] == NO_PIXEL_TRUTH
                continue
            pixel_ids = [i for i in ids if rows[i]["label"] == 0 or rows[i]["mask"] is not None]
            stack = np.stack([maps[i] for i in pixel_ids]).astype(np.float32)
            masks = np.stack([_mask(rows[i], stack.shape[-1], "res2clip") for i in pixel_ids])
            p_auroc, p_ap, _ = sklearn_metrics(masks, stack)
            assert metrics["P-AUROC"] == pytest.approx(p_auroc, abs=1e-6), (name, defect)
            assert metrics["P-AP"] == pytest.approx(p_ap, abs=1e-6), (name, defect)
            assert metrics["AUPRO@0.3"] == pytest.approx(exact_aupro(stack, masks), abs=1e-6), (name, defect)
    saved = storage.read_json(storage.join(result.job_url, "metrics.json"))
    assert saved["per_defect_type"] == result.per_defect_type


def _typed_rows(data_url: str, dataset: str, category: str) -> dict[str, dict]:
    table = read_table(data_url, columns=["image_id", "defect_type"],
                       filters=[("dataset", "==", dataset), ("category", "==", category),
                                ("split", "==", "test")])
    return {r["image_id"]: r for r in table.to_pylist()}


def test_resadpp_set_normalisation_is_finished_per_category(local_ray, data_url, tmp_path):
    """Scores through shards of 2 images and batches of 3 equal the authors' whole-set normalisation
    computed in memory on the same inputs; an interrupted run resumes to the same results."""
    import torch

    from residual_core.images import decode_image
    from residual_core.preprocess import get_preprocess
    from workflows.pipelines.models import load_bank_url, load_method
    from workflows.pipelines.scoring import ScoringJob

    interrupted = _config(tmp_path, data_url, "resadpp", RESADPP, "evaluate.shard_size=2",
                          "evaluate.batch_size=3", "evaluate.stop_after_shards=2")
    run_evaluate(interrupted, progress=False)
    (result,) = run_evaluate(_config(tmp_path, data_url, "resadpp", RESADPP, "evaluate.shard_size=2",
                                     "evaluate.batch_size=3"), progress=False)
    assert result.completed and result.resumed_shards == 2
    assert storage.list_urls(storage.join(result.job_url, "reduced"))
    pipeline = {r["image_id"]: r for r in ShardStore(result.job_url).read_results().to_pylist()}

    config = _config(tmp_path, data_url, "resadpp", RESADPP)
    job = ScoringJob.from_json(_job_json(config, result))
    method = load_method(job.backbone, job.method, "cpu")
    normaliser = method.set_normaliser()
    for name, bank_url in job.banks.items():
        dataset, category = name.split("/")
        rows = _test_rows(data_url, dataset, category)
        ids = sorted(i for i in rows if pipeline.get(i, {}).get("status") == "scored")
        preset = get_preprocess(job.preprocess)
        images = torch.stack([preset.image(decode_image(rows[i]["image"]), job.image_size, job.mean, job.std)
                              for i in ids])
        raw = method.score_raw(images, load_bank_url(bank_url, "cpu"))
        out = normaliser.finish(raw, normaliser.statistics(lambda raw=raw: iter([raw])))
        expected = out.image_score.numpy()
        got = np.array([pipeline[i]["image_score"] for i in ids], np.float32)
        assert np.abs(got - expected).max() < 1e-5, name
        assert result.per_category[name]["I-AUROC"] is not None
        # the set-reduce path commits grouped states too: per defect type, its images against the normals
        labels = np.array([rows[i]["label"] for i in ids])
        types = _typed_rows(data_url, dataset, category)
        for defect, metrics in result.per_defect_type[name].items():
            chosen = [n for n, i in enumerate(ids) if labels[n] == 0 or types[i]["defect_type"] == defect]
            i_auroc, _, _ = sklearn_metrics(labels[chosen], got[chosen])
            assert metrics["I-AUROC"] == pytest.approx(i_auroc, abs=1e-6), (name, defect)
        assert sorted(result.per_defect_type[name]) == ["bright", "dark"]
    # reading the committed job restores the per-defect-type metrics
    (again,) = run_evaluate(_config(tmp_path, data_url, "resadpp", RESADPP, "evaluate.shard_size=2",
                                    "evaluate.batch_size=3"), progress=False)
    assert again.per_defect_type == result.per_defect_type and again.per_category == result.per_category


def _job_json(config, result):
    """The ScoringJob of `result` as the driver built it (same spec, same banks)."""
    from dataclasses import asdict

    from workflows.pipelines.index import BankRequest, ensure_banks
    from workflows.pipelines.models import method_preprocess, probe_backbone
    from workflows.pipelines.scoring import ScoringJob

    info = probe_backbone(asdict(config.backbone))
    preprocess = method_preprocess(config.method)
    pairs = [name.split("/") for name in result.per_category]
    requests = {f"{d}/{c}": BankRequest(d, c, 1, 0, preprocess) for d, c in pairs}
    plans = ensure_banks(config, list(requests.values()), progress=False)
    banks = {name: plans[request].url for name, request in requests.items()}
    return ScoringJob(job_id="check", job_url=result.job_url, backbone=asdict(config.backbone),
                      method=asdict(config.method), banks=banks, preprocess=preprocess,
                      image_size=info.image_size, mean=info.mean, std=info.std).to_json()
