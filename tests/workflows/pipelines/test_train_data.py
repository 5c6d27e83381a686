"""What `train` loads for each method, and what the train log records about it (no Ray: the task body)."""

from __future__ import annotations

import pytest
import torch

from tests.workflows.pipelines.tiny_data import write_tiny
from workflows import storage
from workflows.config import MethodConfig, load_config
from workflows.pipelines.index import normal_train_ids, read_images
from workflows.pipelines.models import probe_backbone
from workflows.pipelines.train import LOG_NAME, TrainSpec, load_train_data, train_task

N_TRAIN, N_NORMAL, N_ANOMALOUS = 5, 2, 2
TINY_RESADPP = {"epochs": 2, "first_stage_epochs": 1, "batch_size": 4, "coupling_layers": 1,
                "num_embeddings": 16, "pos_embed_dim": 8}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny") / "data"), n_train=N_TRAIN, n_normal=N_NORMAL,
                      n_anomalous=N_ANOMALOUS)


def _config(data, output, *extra):
    return load_config(None, [f"data.url={data}", f"output={output}", "backbone.image_size=64",
                              "tracking.enabled=false", "train.ref_shot=2", *extra])


def _info(config):
    from dataclasses import asdict

    return probe_backbone(asdict(config.backbone))


def test_pool_holds_every_normal_train_image_and_images_the_test_split(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path)
    info = _info(config)
    datasets = ("textures", "labels")
    plain, plain_contrib, plain_refs = load_train_data(config, datasets, 0, info, "torch-bicubic")
    pooled, contrib, refs = load_train_data(config, datasets, 0, info, "torch-bicubic", normal_pool=True)
    assert [c.name for c in pooled] == ["labels/camera", "textures/brick", "textures/grass"]
    assert refs == plain_refs
    for without, cat in zip(plain, pooled, strict=True):
        # methods without a pool (Res2CLIP) get exactly what they got before
        assert without.normal_pool is None
        assert torch.equal(without.images, cat.images) and torch.equal(without.references, cat.references)
        # images: the test split (normal and anomalous); the pool: every normal train image, as uint8
        assert cat.image_split == "test" and cat.images.shape[0] == N_NORMAL + N_ANOMALOUS
        assert cat.labels.tolist().count(0) == N_NORMAL
        pool = cat.normal_pool
        assert pool.split == "train" and len(pool) == N_TRAIN and pool.pixels.dtype == torch.uint8
        ids = normal_train_ids(config.data.url, cat.dataset, cat.category)
        decoded = read_images(config.data.url, cat.dataset, cat.category, "train", ids, info, "torch-bicubic")
        assert torch.allclose(pool.images(), decoded, atol=0.51 / 255 / min(info.std) + 1e-6)
    assert contrib["textures"]["train_normal_images"] == 2 * N_TRAIN
    assert plain_contrib["textures"]["train_normal_images"] == 0


def test_cap_applies_to_the_test_images_and_to_the_pool(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path, "train.max_images_per_category=3")
    data, _, _ = load_train_data(config, ("textures",), 0, _info(config), "resad", normal_pool=True)
    for cat in data:
        assert cat.images.shape[0] == 3 and len(cat.normal_pool) == 3 and cat.references.shape[0] == 2


def test_train_log_records_what_was_drawn_from_where(tiny_data, tmp_path):
    config = _config(tiny_data, tmp_path)
    spec = TrainSpec(("textures", "labels"), MethodConfig(name="resadpp", params=TINY_RESADPP), seed=0)
    url = str(tmp_path / "ckpt")
    train_task(config.to_dict(), spec, url)
    log = storage.read_json(storage.join(url, LOG_NAME))
    brick = log["contributions"]["textures"]["training_data"]["brick"]
    assert brick["stage1"] == {"images": N_TRAIN, "splits": {"train": N_TRAIN}, "labels": "normal",
                               "epochs": 1}
    assert brick["stage2"] == {"images": N_TRAIN + N_NORMAL + N_ANOMALOUS,
                               "splits": {"train": N_TRAIN, "test": N_NORMAL + N_ANOMALOUS},
                               "anomalous": N_ANOMALOUS, "anomalous_with_mask": N_ANOMALOUS, "epochs": 1}
    pool = brick["reference_pool"]
    assert pool["images"] == N_TRAIN and pool["split"] == "train" and pool["field"] == "normal_pool"
    assert pool["draw"].startswith("4 per category")  # resadpp's train_ref_shot, not train.ref_shot
    assert "with replacement" in pool["draw"] and "every batch" in pool["draw"]
    assert brick["offset_calibration"] == {"images": N_NORMAL, "split": "test", "labels": "normal"}
    camera = log["contributions"]["labels"]["training_data"]["camera"]
    assert camera["stage2"]["anomalous_with_mask"] == 0  # no masks in this dataset
    assert set(log["contributions"]["textures"]["training_data"]) == {"brick", "grass"}
    assert log["contributions"]["textures"]["train_normal_images"] == 2 * N_TRAIN


def test_each_run_seed_is_its_own_training_and_scoring_variants_share_one(tiny_data, tmp_path):
    from safetensors.torch import load_file

    from workflows.pipelines.train import checkpoint_url

    config = _config(tiny_data, tmp_path)
    weights = {}
    for seed in (0, 1):
        spec = TrainSpec(("textures",), MethodConfig(name="resadpp", params=TINY_RESADPP), seed=seed)
        url = str(tmp_path / f"ckpt{seed}")
        train_task(config.to_dict(), spec, url)
        weights[seed] = load_file(f"{url}/resadpp.safetensors")
        header = storage.read_json(f"{url}/resadpp.json")
        assert header["config"]["seed"] == 42 + seed  # the authors' 42 at seed 0
    differs = {k.split(".")[0] for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])}
    assert {"vq", "constraintor", "flows"} <= differs  # another initialisation, not a replay

    def url_of(params):
        return checkpoint_url(config, TrainSpec(("textures",), MethodConfig("resadpp", params), 0), "id")

    assert url_of({**TINY_RESADPP, "score_branch": "boundary"}) == url_of(TINY_RESADPP)
    assert url_of({**TINY_RESADPP, "constraintor": "none"}) != url_of(TINY_RESADPP)
