"""ResAD++ training data as the authors draw it, and the likelihood offsets calibrated after training.

Stage 1 on the normal `train` pool, stage 2 on pool + `images`, references redrawn every batch from the
whole pool; every level's offset is set even where training never gives its flow a position sub-batch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from residual_core.backbones import create_backbone
from residual_core.methods import AnomalyMethod, CategoryTrainData, ImagePool, MethodError, create_method
from residual_core.methods.resadpp import method as resadpp_method
from residual_core.methods.resadpp.residuals import residual_maps
from residual_core.methods.resadpp.vq import match_feature_distribution

SIZE = 64  # effnet-lite0 grids 16x16, 8x8, 4x4
TINY = dict(num_embeddings=16, coupling_layers=1, pos_embed_dim=8, smoothing_sigma=1.0, lr=1e-3,
            position_batch=100_000, keep_partial_position_batch=True)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("effnet-lite0", image_size=SIZE)


def pool_of(n: int, seed: int) -> ImagePool:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8)
    return ImagePool(pixels, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def category(pool: int | None, seed: int = 0, name: str = "c") -> CategoryTrainData:
    """4 test images (2 normal, 1 anomalous with a mask, 1 without), 2 fixed references, a pool of `pool`."""
    g = torch.Generator().manual_seed(seed + 100)
    masks = torch.zeros(4, 1, SIZE, SIZE)
    masks[2, :, 16:32, 16:32] = 1
    return CategoryTrainData(
        dataset="d", category=name, references=torch.randn(2, 3, SIZE, SIZE, generator=g),
        images=torch.randn(4, 3, SIZE, SIZE, generator=g), labels=torch.tensor([0, 0, 1, 1]), masks=masks,
        has_mask=torch.tensor([False, False, True, False]),
        normal_pool=pool_of(pool, seed) if pool is not None else None,
    )


class Spy:
    """Records the items of every residual batch (training and calibration) and every reference draw."""

    def __init__(self, monkeypatch):
        self.batches: list[list] = []
        self.draws: list[dict[int, list[int]]] = []
        original_batch = resadpp_method.ResADpp._residual_batch
        original_draw = resadpp_method.draw_references

        def batch(method, data, items, rng):
            self.batches.append(list(items))
            return original_batch(method, data, items, rng)

        def draw(data, categories, shot, rng):
            picks = original_draw(data, categories, shot, rng)
            self.draws.append({c: p.tolist() for c, p in picks.items()})
            return picks

        monkeypatch.setattr(resadpp_method.ResADpp, "_residual_batch", batch)
        monkeypatch.setattr(resadpp_method, "draw_references", draw)


def test_image_pool_keeps_uint8_pixels_and_normalises_on_read():
    pool = pool_of(3, seed=1)
    images = pool.images([2, 0])
    assert images.dtype == torch.float32 and images.shape == (2, 3, SIZE, SIZE)
    assert torch.allclose(images[0], (pool.pixels[2].float() / 255 - 0.5) / 0.5)
    assert torch.equal(ImagePool.quantize(pool.images(), pool.mean, pool.std), pool.pixels)  # lossless
    with pytest.raises(MethodError, match="uint8"):
        ImagePool(pool.pixels.float(), pool.mean, pool.std)


def test_stages_and_references_follow_the_authors(backbone, monkeypatch):
    spy = Spy(monkeypatch)
    method = create_method("resadpp", backbone, epochs=2, first_stage_epochs=1, batch_size=4, **TINY)
    data = [category(pool=6, seed=0)]
    ends, steps = {}, []  # epoch -> batches drawn by its last step; the steps logged

    def log(step, metrics):
        steps.append(step)
        ends[int(metrics["epoch"])] = len(spy.batches)

    method.fit(data, log)
    epochs_at = [ends[0], ends[1]]
    assert steps == list(range(1, method.planned_steps(data) + 1)) == [1, 2, 3]  # one log per step
    stage1, stage2 = spy.batches[:epochs_at[0]], spy.batches[epochs_at[0]:epochs_at[1]]
    # stage 1: normal train images only (the pool), one full batch of 4 of the 6 (drop_last)
    assert [len(b) for b in stage1] == [4]
    assert all(source == resadpp_method.POOL for b in stage1 for _, source, _ in b)
    # stage 2: pool (train) + images (test): 10 items, two full batches, both sources present
    assert [len(b) for b in stage2] == [4, 4]
    assert {source for b in stage2 for _, source, _ in b} == {resadpp_method.POOL, resadpp_method.IMAGES}
    s1, s2 = resadpp_method.stage_items(data)
    assert s1 == [(0, "normal_pool", i) for i in range(6)]
    assert s2 == s1 + [(0, "images", i) for i in range(4)]
    # references come from the pool, never from the fixed `references`
    assert resadpp_method._reference_source(data[0]) == ("normal_pool", 6, "train")


def test_references_are_redrawn_each_batch_from_the_whole_pool(backbone, monkeypatch):
    spy = Spy(monkeypatch)
    # flows off (no position sub-batch fits): only the draws matter here, and the test stays fast
    method = create_method("resadpp", backbone, epochs=2, first_stage_epochs=1, batch_size=4,
                           **{**TINY, "position_batch": 10**6, "keep_partial_position_batch": False})
    data = [category(pool=8, seed=3, name="a"), category(pool=5, seed=4, name="b")]
    trained = []
    method.fit(data, lambda epoch, metrics: trained.append(len(spy.draws)))
    training = spy.draws[:trained[-1]]  # the draws after the last epoch are the calibration's
    assert len(training) == 3 + 5  # 13 pool images, then 13 + 8 images, in full batches of 4
    for draw in spy.draws:
        assert all(len(picks) <= 4 for picks in draw.values())  # 4 draws with replacement, repeats merged
    used = {c: {i for draw in training for i in draw.get(c, [])} for c in (0, 1)}
    assert len(used[0]) > 4 and used[0] <= set(range(8))  # more than a fixed set of 4
    assert len(used[1]) > 4 and used[1] <= set(range(5))
    # each batch draws for exactly the categories present in it
    for items, draw in zip(spy.batches, spy.draws, strict=True):
        assert set(draw) == {c for c, _, _ in items}


def test_draw_rule_is_uniform_with_replacement_per_category():
    data = [category(pool=7, seed=0), category(pool=None, seed=1)]
    picks = resadpp_method.draw_references(data, [1, 0], 4, np.random.default_rng(5))
    expected = np.random.default_rng(5)
    assert list(picks) == [0, 1]  # sorted category order (np.unique of the batch's class names)
    assert picks[0].tolist() == sorted(set(expected.integers(7, size=4).tolist()))
    assert picks[1].tolist() == sorted(set(expected.integers(2, size=4).tolist()))  # no pool: references


def test_without_a_pool_the_old_data_are_used(backbone, monkeypatch):
    spy = Spy(monkeypatch)
    method = create_method("resadpp", backbone, epochs=2, first_stage_epochs=1, batch_size=4, **TINY)
    method.fit([category(pool=None)])
    assert {source for b in spy.batches for _, source, _ in b} == {"images"}
    assert sorted(spy.batches[0]) == [(0, "images", 0), (0, "images", 1)]  # stage 1: the normal images


def test_every_level_gets_its_offset_where_training_never_reaches_it(backbone):
    # the configuration that failed: batch 4 at 64 px gives 4*4*4 = 64 level-3 positions per batch,
    # fewer than position_batch = 100, and the partial sub-batch is dropped, so the level-3 flow never
    # trains and the old "max logp seen in the last epoch" left its offset at 0
    method = create_method("resadpp", backbone, epochs=2, first_stage_epochs=1, batch_size=4,
                           **{**TINY, "position_batch": 100, "keep_partial_position_batch": False})
    assert method.grids[-1] == (4, 4) and 4 * 16 < method.config.position_batch
    untouched = [p.detach().clone() for p in method.flows[-1].parameters()]
    data = [category(pool=1, seed=7)]  # one pool image: every draw is that image
    method.fit(data)
    assert all(torch.equal(a, b) for a, b in zip(untouched, method.flows[-1].parameters(), strict=True))
    offsets = method.logp_offsets
    assert torch.isfinite(offsets).all() and (offsets != 0).all()

    # the max normal log-likelihood of the calibration data (the normal test images), scored one at a
    # time against the pool image through the scoring path
    reference = [level.flatten(2).transpose(1, 2).reshape(-1, level.shape[1])
                 for level in method.feature_maps(data[0].normal_pool.images())]
    maxima = torch.full((len(method.channels),), -torch.inf)
    with torch.no_grad():
        for image in data[0].images[data[0].labels == 0]:
            residuals = residual_maps(method.feature_maps(image[None]), reference,
                                      method.config.residual_squared)
            aligned = [match_feature_distribution(r, q, method.config.fdm_alpha)
                       for r, q in zip(residuals, method.vq.quantize(residuals), strict=True)]
            for level, e in enumerate(method.constraintor(aligned)):
                maxima[level] = max(maxima[level], method._flow_logps(level, e)[0].max())
    assert torch.allclose(offsets.cpu(), maxima, atol=1e-4), (offsets, maxima)


def test_training_data_record_names_splits_counts_and_the_draw_rule(backbone):
    method = create_method("resadpp", backbone, epochs=3, first_stage_epochs=1, **TINY)
    record = method.training_data_record([category(pool=6), category(pool=None, name="old")])
    new = record["d/c"]
    assert new["stage1"] == {"images": 6, "splits": {"train": 6}, "labels": "normal", "epochs": 1}
    assert new["stage2"] == {"images": 10, "splits": {"train": 6, "test": 4}, "anomalous": 2,
                             "anomalous_with_mask": 1, "epochs": 2}
    assert new["reference_pool"]["images"] == 6 and new["reference_pool"]["split"] == "train"
    assert "with replacement" in new["reference_pool"]["draw"]
    assert "every batch" in new["reference_pool"]["draw"]
    assert new["offset_calibration"] == {"images": 2, "split": "test", "labels": "normal"}
    old = record["d/old"]
    assert old["stage1"]["splits"] == {"test": 2} and old["stage2"]["splits"] == {"test": 4}
    assert old["reference_pool"]["field"] == "references" and old["reference_pool"]["images"] == 2
    # methods without their own record describe their fields generically
    generic = AnomalyMethod.training_data_record(method, [category(pool=None)])["d/c"]
    assert generic == {"images": {"count": 4, "split": "test", "anomalous": 2},
                       "references": {"count": 2, "split": "train"}}
