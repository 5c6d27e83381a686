"""MetricAccumulator against exact sort-based references on random and adversarial inputs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from residual_core.metrics import MetricAccumulator
from tests.residual_core.metrics.references import exact_aupro, sklearn_metrics

TOLERANCE = 1e-4
PIXEL_NAMES = ("P-AUROC", "P-AP", "P-F1max")
STATE_ARRAYS = ("normal_keys", "normal_counts", "anomalous_keys", "anomalous_counts", "anomalous_overlap")


def random_masks(rng: np.random.Generator, labels: np.ndarray, size: int, density: float) -> np.ndarray:
    masks = np.zeros((len(labels), size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        masks[i] = rng.random((size, size)) < density
        masks[i, rng.integers(size), rng.integers(size)] = True  # never empty unless asked
    return masks


def make_case(kind: str, seed: int = 0, images: int = 12, size: int = 24):
    rng = np.random.default_rng(seed)
    labels = (np.arange(images) % 3 == 0).astype(int)
    masks = random_masks(rng, labels, size, 0.08)
    maps = rng.normal(size=(images, size, size)) + 1.5 * masks
    if kind == "random":
        pass
    elif kind == "outliers":  # tiny scale with outliers 40 orders of magnitude larger, both signs
        maps = maps * 1e-20
        flat = maps.reshape(-1)
        flat[rng.choice(flat.size, 20, replace=False)] = rng.choice([-1e25, 1e25, 3e30], 20)
    elif kind == "offset":  # small differences on a large offset: resolution must be relative to data
        maps = 1000.0 + maps * 1e-2
    elif kind == "negative":
        maps = -np.exp(-maps) * 1e6
    elif kind == "heavy_ties":
        maps = np.round(maps, 1)
    elif kind == "all_tied":
        maps = np.full(maps.shape, 0.25)
    elif kind == "two_levels":
        maps = (rng.random(maps.shape) < 0.5 + 0.3 * masks).astype(float)
    elif kind == "one_pixel_regions":  # isolated single pixels (no 8-neighbours) in every anomalous image
        masks = np.zeros_like(masks)
        masks[labels.astype(bool), 1::4, 2::4] = True
        maps = rng.normal(size=maps.shape) + masks * rng.normal(1.0, 1.0, size=maps.shape)
    elif kind == "many_tiny_regions":  # dense speckle: many tiny regions, diagonal contacts join them
        masks = random_masks(rng, labels, size, 0.3)
        maps = rng.normal(size=maps.shape) + 0.7 * masks
    else:
        raise AssertionError(kind)
    maps = maps.astype(np.float32)
    scores = maps.reshape(images, -1).max(axis=1) + rng.normal(scale=0.1, size=images).astype(np.float32)
    if kind in ("all_tied", "two_levels"):
        scores = maps.reshape(images, -1).mean(axis=1).round(1).astype(np.float32)
    return scores.astype(np.float32), labels, maps, masks


def accumulate(scores, labels, maps, masks, batch: int = 5, **kwargs) -> MetricAccumulator:
    acc = MetricAccumulator(**kwargs)
    for start in range(0, len(labels), batch):
        sl = slice(start, start + batch)
        acc.update(scores[sl], labels[sl], maps[sl], masks[sl])
    return acc


def assert_matches_references(result: dict, scores, labels, maps, masks, tol: float = TOLERANCE) -> None:
    for name, expected in zip(("I-AUROC", "I-AP", "I-F1max"), sklearn_metrics(labels, scores), strict=True):
        assert result[name] == pytest.approx(expected, abs=tol), name
    for name, expected in zip(PIXEL_NAMES, sklearn_metrics(masks, maps), strict=True):
        assert result[name] == pytest.approx(expected, abs=tol), name
    assert result["AUPRO@0.3"] == pytest.approx(exact_aupro(maps, masks, 0.3), abs=tol)


KINDS = ["random", "outliers", "offset", "negative", "heavy_ties", "all_tied", "two_levels",
         "one_pixel_regions", "many_tiny_regions"]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_exact_references(kind):
    scores, labels, maps, masks = make_case(kind)
    result = accumulate(scores, labels, maps, masks).compute()
    assert result["not_defined"] == {}
    assert result["resolution"]["pixel_shift"] == 0  # few distinct values: exact bins
    assert_matches_references(result, scores, labels, maps, masks, tol=1e-9)


def test_constant_maps_have_known_values():
    scores, labels, maps, masks = make_case("all_tied")
    result = accumulate(scores, labels, maps, masks).compute()
    assert result["P-AUROC"] == pytest.approx(0.5)
    assert result["P-AP"] == pytest.approx(masks.mean())
    assert result["AUPRO@0.3"] == pytest.approx(0.15)  # the diagonal from (0, 0) to (1, 1), area to 0.3 / 0.3


@pytest.mark.parametrize("kind", ["random", "heavy_ties", "outliers", "offset"])
def test_collapsed_histogram_errors_stay_within_certified_bounds(kind):
    """A capacity far below the number of distinct values forces coarser bins; the reported worst-case
    bound must hold for every metric, and AUROC/AUPRO stay within 1e-4 even at ~6 pixels per bin."""
    scores, labels, maps, masks = make_case(kind, images=24, size=64)
    result = accumulate(scores, labels, maps, masks, pixel_capacity=1 << 14).compute()
    resolution = result["resolution"]
    if kind in ("random", "outliers"):  # more distinct values than bins (offset/ties have few)
        assert resolution["pixel_shift"] > 0
    assert resolution["pixel_bins"] <= 1 << 14
    exact = dict(zip(PIXEL_NAMES, sklearn_metrics(masks, maps), strict=True))
    exact["AUPRO@0.3"] = exact_aupro(maps, masks)
    for name, value in exact.items():
        assert abs(result[name] - value) <= resolution["error_bounds"][name] + 1e-12, name
    for name in ("P-AUROC", "AUPRO@0.3"):
        assert result[name] == pytest.approx(exact[name], abs=TOLERANCE), name


@pytest.mark.parametrize("capacity", [1 << 20, 1 << 10])
def test_shuffled_shard_merges_are_identical(capacity):
    scores, labels, maps, masks = make_case("random", images=30, size=32)
    one_pass = accumulate(scores, labels, maps, masks, pixel_capacity=capacity)
    expected_state = one_pass.state_dict()
    rng = np.random.default_rng(1)
    for _ in range(3):
        order = rng.permutation(len(labels))
        shards = [order[i::4] for i in range(4)]
        accs = [accumulate(scores[s], labels[s], maps[s], masks[s], batch=int(rng.integers(1, 6)),
                           pixel_capacity=capacity) for s in shards]
        rng.shuffle(accs)
        merged = accs[0].merge(accs[1]).merge(accs[2].merge(accs[3]))  # tree order, not a chain
        state = merged.state_dict()
        assert state["pixel_histogram"]["shift"] == expected_state["pixel_histogram"]["shift"]
        for hist in ("image_histogram", "pixel_histogram"):
            for key in STATE_ARRAYS:
                np.testing.assert_array_equal(state[hist][key], expected_state[hist][key])
        assert state["counts"] == expected_state["counts"]
        assert merged.compute() == one_pass.compute()


def test_state_dict_is_plain_and_round_trips():
    scores, labels, maps, masks = make_case("random")
    acc = accumulate(scores, labels, maps, masks)
    state = acc.state_dict()
    blob = pickle.dumps(state)
    assert b"torch" not in blob
    restored = MetricAccumulator.from_state_dict(pickle.loads(blob))
    assert restored.compute() == acc.compute()
    restored.update(scores[:2], labels[:2], maps[:2], masks[:2])  # keeps accumulating
    with pytest.raises(ValueError, match="version"):
        MetricAccumulator.from_state_dict({**state, "version": 99})


def test_state_is_bounded_by_capacity_not_images():
    rng = np.random.default_rng(3)
    acc = MetricAccumulator(pixel_capacity=4096)
    for _ in range(8):
        maps = rng.random((4, 32, 32)).astype(np.float32)
        masks = np.zeros((4, 32, 32), dtype=bool)
        masks[:2, :8, :8] = True
        acc.update(maps.max(axis=(1, 2)), np.array([1, 1, 0, 0]), maps, masks)
        hist = acc.pixel_hist
        queued = sum(len(p) for pair in hist.pending for p in pair if p is not None)
        window = 0 if hist.window is None else len(hist.window)
        assert len(hist.normal) + len(hist.anomalous) <= 4096 and queued < 4096 + 4 * 32 * 32
        assert window <= 2 * 4096
    state = acc.state_dict()["pixel_histogram"]
    assert len(state["normal_keys"]) + len(state["anomalous_keys"]) <= 4096


def test_images_without_mask_count_for_image_metrics_only():
    scores, labels, maps, masks = make_case("random")
    has_mask = np.ones(len(labels), dtype=bool)
    has_mask[[0, 1, 3]] = False  # image 0 and 3 are anomalous, image 1 is normal
    acc = MetricAccumulator()
    acc.update(scores, labels, maps, masks, has_mask)
    result = acc.compute()
    assert result["counts"]["images_without_mask"] == 3
    assert result["counts"]["images"] == len(labels)
    for name, expected in zip(("I-AUROC", "I-AP"), sklearn_metrics(labels, scores)[:2], strict=True):
        assert result[name] == pytest.approx(expected, abs=1e-12)
    kept = has_mask
    expected = sklearn_metrics(masks[kept], maps[kept])[0]
    assert result["P-AUROC"] == pytest.approx(expected, abs=1e-12)
    assert result["AUPRO@0.3"] == pytest.approx(exact_aupro(maps[kept], masks[kept]), abs=1e-9)


def test_image_only_dataset_reports_pixel_metrics_as_not_defined():
    scores, labels, maps, _ = make_case("random")
    acc = MetricAccumulator()
    acc.update(scores, labels, maps, None)
    result = acc.compute()
    assert result["I-AUROC"] is not None
    assert result["P-AUROC"] is None and result["AUPRO@0.3"] is None
    assert "ground-truth mask" in result["not_defined"]["P-AUROC"]
    assert result["counts"]["images_without_mask"] == len(labels)


def test_missing_class_is_not_defined_with_reason():
    scores, labels, maps, masks = make_case("random")
    normal = labels == 0
    acc = MetricAccumulator()
    acc.update(scores[normal], labels[normal], maps[normal], masks[normal])
    result = acc.compute()
    assert result["I-AUROC"] is None and "no anomalous images" in result["not_defined"]["I-AUROC"]
    assert result["P-AUROC"] is None and "no anomalous pixels" in result["not_defined"]["P-AUROC"]
    empty = MetricAccumulator().compute()
    assert all(empty[name] is None for name in ("I-AUROC", "P-AP", "AUPRO@0.3"))


def test_anomalous_image_with_empty_mask_is_counted():
    scores, labels, maps, masks = make_case("random")
    masks[0] = False  # image 0 is anomalous
    result = accumulate(scores, labels, maps, masks).compute()
    assert result["counts"]["anomalous_images_with_empty_mask"] == 1
    assert_matches_references(result, scores, labels, maps, masks, tol=1e-9)


@pytest.mark.parametrize("bad, message", [
    (dict(labels=np.array([0, 2])), "labels must be 0"),
    (dict(maps=np.full((2, 4, 4), np.nan, dtype=np.float32)), "NaN"),
    (dict(masks=np.ones((2, 4, 5), dtype=bool)), "must both be"),
    (dict(labels=np.array([0, 0])), "labelled normal"),
])
def test_bad_input_raises_clear_error(bad, message):
    args = dict(scores=np.array([0.1, 0.9], dtype=np.float32), labels=np.array([0, 1]),
                maps=np.zeros((2, 4, 4), dtype=np.float32), masks=np.ones((2, 4, 4), dtype=bool))
    args["masks"][0] = False
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        MetricAccumulator().update(args["scores"], args["labels"], args["maps"], args["masks"])


def test_torch_inputs_give_the_same_state_as_numpy():
    scores, labels, maps, masks = make_case("random")
    expected = accumulate(scores, labels, maps, masks).state_dict()
    acc = MetricAccumulator()
    acc.update(torch.from_numpy(scores), torch.from_numpy(labels), torch.from_numpy(maps)[:, None],
               torch.from_numpy(masks).float()[:, None])
    state = acc.state_dict()
    for key in STATE_ARRAYS:
        np.testing.assert_array_equal(state["pixel_histogram"][key], expected["pixel_histogram"][key])
    assert acc.compute() == MetricAccumulator.from_state_dict(expected).compute()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_are_reduced_on_device_with_identical_state():
    scores, labels, maps, masks = make_case("many_tiny_regions")
    expected = accumulate(scores, labels, maps, masks).state_dict()
    acc = MetricAccumulator()
    acc.update(scores, labels, torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda())
    state = acc.state_dict()
    for key in STATE_ARRAYS:
        np.testing.assert_array_equal(state["pixel_histogram"][key], expected["pixel_histogram"][key])
