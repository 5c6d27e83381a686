"""Checkpoints: safetensors + JSON round trip, and clear errors on a mismatch."""

import json

import pytest
import torch

from residual_core.backbones import create_backbone
from residual_core.methods import MethodError, create_method, method_preprocess
from residual_core.methods.res2clip import Res2Clip
from residual_core.methods.res2clip.checkpoint import HEADER_FILE, WEIGHTS_FILE

from .helpers import make_bank, textured_images


@pytest.fixture(scope="module")
def tuned(clip_backbone):
    """A fine-tuned method with non-trivial adapters (random up-projections instead of training)."""
    method = create_method("res2clip", clip_backbone, mode="finetune", visual_layers=(2, 4))
    torch.manual_seed(0)
    for name, parameter in method.adapters.named_parameters():
        if name.endswith(("up.weight", "fc2.weight")):
            torch.nn.init.normal_(parameter, std=0.05)
    method.training_datasets = [{"dataset": "synthetic", "category": "widget", "images": 4}]
    return method


def test_round_trip_gives_identical_scores(tuned, clip_backbone, tmp_path):
    tuned.save_checkpoint(tmp_path / "ckpt")
    header = json.loads((tmp_path / "ckpt" / HEADER_FILE).read_text())
    assert (tmp_path / "ckpt" / WEIGHTS_FILE).is_file()
    assert header["backbone"]["name"] == clip_backbone.identity.name
    assert header["backbone"]["weights_sha256"] == clip_backbone.identity.weights_sha256 != ""
    assert header["plan"]["visual_layers"] == [2, 4] and header["config"]["mode"] == "finetune"
    assert header["training_datasets"] == tuned.training_datasets

    loaded = create_method("res2clip", clip_backbone, checkpoint=tmp_path / "ckpt")
    assert isinstance(loaded, Res2Clip) and loaded.plan == tuned.plan
    assert loaded.training_datasets == tuned.training_datasets
    assert header["config"]["preprocess"] == loaded.preprocess == "res2clip"  # the preset travels too
    assert method_preprocess("res2clip", {"checkpoint": tmp_path / "ckpt"}) == "res2clip"
    assert method_preprocess("res2clip", {"checkpoint": tmp_path / "ckpt", "preprocess": "resad"}) == "resad"
    bank = make_bank(clip_backbone, textured_images(1, 64, seed=5))
    queries = textured_images(2, 64, seed=6)
    expected, actual = tuned.score(queries, bank), loaded.score(queries, bank)
    torch.testing.assert_close(actual.anomaly_map, expected.anomaly_map)
    torch.testing.assert_close(actual.image_score, expected.image_score)
    fresh = create_method("res2clip", clip_backbone, mode="finetune", visual_layers=(2, 4))
    assert not torch.allclose(fresh.score(queries, bank).image_score, expected.image_score)


def test_mismatches_fail_clearly(tuned, clip_backbone, tiny_openclip_checkpoint, tmp_path):
    tuned.save_checkpoint(tmp_path / "ckpt")
    other_layers = create_method("res2clip", clip_backbone, mode="finetune")
    with pytest.raises(MethodError, match="plan"):
        other_layers.load_checkpoint(tmp_path / "ckpt")
    small = create_backbone(tiny_openclip_checkpoint.spec, image_size=32)
    other_backbone = create_method("res2clip", small, mode="finetune", visual_layers=(2, 4))
    with pytest.raises(MethodError, match="backbone.image_size"):
        other_backbone.load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(MethodError, match="missing res2clip.json"):
        tuned.load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(MethodError, match="no adapters to save"):
        create_method("res2clip", clip_backbone).save_checkpoint(tmp_path / "free")
