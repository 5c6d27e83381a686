"""Galleries show originals as the job's preprocessing preset showed them to the model."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from residual_core.images import decode_image, decode_mask
from residual_core.preprocess import get_preprocess
from workflows import storage
from workflows.datasets.writer import write_dataset
from workflows.pipelines.shards import plan_shards
from workflows.reports import job_outputs

WIDTH, HEIGHT, S = 60, 30, 16


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_originals_follow_the_preset_and_the_job_says_which(tmp_path):
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    image[:, :, 0] = np.linspace(0, 255, WIDTH, dtype=np.uint8)[None]  # left-right ramp: crops show
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[5:15, 2:12] = 255  # near the left edge: outside the centre crop
    mask[10:20, 28:34] = 255  # in the centre
    row = {"dataset": "d", "category": "c", "split": "test", "label": 1, "defect_type": "x",
           "image": _png(image), "mask": _png(mask), "width": WIDTH, "height": HEIGHT, "source": "c/0.png"}
    url = str(tmp_path / "data")
    write_dataset([row], url)
    (shard,) = plan_shards(url, split="test", shard_size=4)
    image_id = next(iter(job_outputs.read_shard(shard, columns=("image_id",)).column("image_id").to_pylist()))
    decoded = decode_image(row["image"])
    for name in ("resad", "res2clip"):
        preset = get_preprocess(name)
        shown, shown_mask = job_outputs.load_originals(shard, [image_id], (S, S), name)[image_id]
        np.testing.assert_array_equal(shown, preset.display(decoded, S))
        expected_mask = preset.mask(decode_mask(row["mask"], decoded.size), S)[0].numpy() > 0.5
        np.testing.assert_array_equal(shown_mask, expected_mask)
    cropped = job_outputs.load_originals(shard, [image_id], (S, S), "resad")[image_id]
    whole = job_outputs.load_originals(shard, [image_id], (S, S), "res2clip")[image_id]
    assert cropped[1].sum() < whole[1].sum()  # the left defect lies outside the crop
    old = job_outputs.load_originals(shard, [image_id], (S, S))[image_id]  # no preset known: whole image
    assert old[0].shape == (S, S, 3)

    job_url = str(tmp_path / "job")
    assert job_outputs.job_preprocess(job_url) is None
    storage.atomic_write_json(storage.join(job_url, "metrics.json"), {"spec": {}})
    assert job_outputs.job_preprocess(job_url) == "torch-bicubic"  # evaluated before presets existed
    storage.atomic_write_json(storage.join(job_url, "metrics.json"), {"spec": {}, "preprocess": "resad"})
    assert job_outputs.job_preprocess(job_url) == "resad"
