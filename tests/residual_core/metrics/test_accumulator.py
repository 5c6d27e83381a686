"""MetricAccumulator against exact sort-based references on random and adversarial inputs."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from residual_core.metrics import MetricAccumulator
from residual_core.metrics.encoding import FLOAT32_ZERO_BITS, decode_numpy, encode_numpy
from residual_core.metrics.histogram import CollapsingHistogram
from tests.residual_core.metrics.references import assert_same_histogram_state, exact_aupro, sklearn_metrics

TOLERANCE = 1e-4
PIXEL_NAMES = ("P-AUROC", "P-AP", "P-F1max")



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
        for hist in ("image_histogram", "pixel_histogram"):
            assert_same_histogram_state(state[hist], expected_state[hist])
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
        assert len(hist.normal) + len(hist.anomalous) <= 2 * 4096 and queued < 4096 + 4 * 32 * 32
        assert window <= 2 * 4096
    state = acc.state_dict()["pixel_histogram"]
    assert len(state["normal_counts"]) <= 4096  # distinct scores (union of both classes)


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
    assert_same_histogram_state(state["pixel_histogram"], expected["pixel_histogram"])
    assert acc.compute() == MetricAccumulator.from_state_dict(expected).compute()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_are_reduced_on_device_with_identical_state():
    scores, labels, maps, masks = make_case("many_tiny_regions")
    expected = accumulate(scores, labels, maps, masks).state_dict()
    acc = MetricAccumulator()
    acc.update(scores, labels, torch.from_numpy(maps).cuda(), torch.from_numpy(masks).cuda())
    assert_same_histogram_state(acc.state_dict()["pixel_histogram"], expected["pixel_histogram"])


# -- issue 13: float64, bfloat16/float16, capacity counted in distinct scores, state versions --------------


def test_float64_scores_below_float32_resolution_stay_distinct():
    """1.0 and 1.0 + 1e-12 are one float32 value (a tie: AUROC 0.5) but two float64 values (AUROC 1.0)."""
    scores = np.array([1.0, 1.0, 1.0 + 1e-12, 1.0 + 2e-12])
    labels = np.array([0, 0, 1, 1])
    assert len(np.unique(scores.astype(np.float32))) == 1
    maps = np.broadcast_to(scores[:, None, None], (4, 4, 4)).copy()
    masks = np.zeros((4, 4, 4), dtype=bool)
    masks[2:, 1:3, 1:3] = True
    maps[masks] += 1e-12  # anomalous pixels just above every normal one, still one float32 value
    acc = MetricAccumulator()
    acc.update(scores, labels, maps, masks)
    result = acc.compute()
    for name in ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max"):
        assert result[name] == 1.0, name
    assert result["AUPRO@0.3"] == pytest.approx(1.0, abs=1e-9)
    assert result["resolution"]["image_shift"] == result["resolution"]["pixel_shift"] == 0
    for name in ("I-AUROC", "P-AUROC", "P-AP"):  # against sklearn on the float64 scores themselves
        expected = sklearn_metrics(labels if name[0] == "I" else masks, scores if name[0] == "I" else maps,
                                   dtype=np.float64)
        assert result[name] == pytest.approx(expected[0 if "AUROC" in name else 1], abs=1e-12)


@pytest.mark.parametrize("capacity", [1 << 20, 1 << 9])
def test_float64_shards_merge_identically_in_any_order(capacity):
    scores, labels, maps, masks = make_case("random", images=20, size=16)
    rng = np.random.default_rng(5)
    maps = maps.astype(np.float64) + rng.integers(0, 4, size=maps.shape) * 1e-13  # float32 ties split
    scores = scores.astype(np.float64) + rng.integers(0, 4, size=scores.shape) * 1e-13
    expected = accumulate(scores, labels, maps, masks, pixel_capacity=capacity).state_dict()
    if capacity < 1 << 20:
        assert expected["pixel_histogram"]["shift"] > 0
    for _ in range(2):
        order = rng.permutation(len(labels))
        accs = [accumulate(scores[s], labels[s], maps[s], masks[s], batch=int(rng.integers(1, 5)),
                           pixel_capacity=capacity) for s in (order[:7], order[7:12], order[12:])]
        rng.shuffle(accs)
        state = accs[0].merge(accs[1].merge(accs[2])).state_dict()
        for hist in ("image_histogram", "pixel_histogram"):
            assert_same_histogram_state(state[hist], expected[hist])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "numpy float16"])
def test_half_precision_inputs_equal_the_float32_result(dtype):
    scores, labels, maps, masks = make_case("random")
    if dtype == "numpy float16":
        half_scores, half_maps = scores.astype(np.float16), maps.astype(np.float16)
        as32 = (half_scores.astype(np.float32), half_maps.astype(np.float32))
    else:
        torch_dtype = getattr(torch, dtype)
        half_scores = torch.from_numpy(scores).to(torch_dtype)
        half_maps = torch.from_numpy(maps).to(torch_dtype)
        as32 = (half_scores.float().numpy(), half_maps.float().numpy())
    acc = MetricAccumulator()
    acc.update(half_scores, torch.from_numpy(labels), half_maps, torch.from_numpy(masks).to(torch.bfloat16))
    expected = accumulate(as32[0], labels, as32[1], masks, batch=len(labels))
    for hist in ("image_histogram", "pixel_histogram"):
        assert_same_histogram_state(acc.state_dict()[hist], expected.state_dict()[hist])
    assert acc.compute() == expected.compute()


def narrow_range_case(levels: int, images: int = 16, size: int = 48, seed: int = 0):
    """``levels`` distinct float32 scores in [0.5, 0.5 + levels * 1e-7): both classes cover most of them."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(images) % 2).astype(int)
    masks = np.zeros((images, size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        for _ in range(2):
            h, w = rng.integers(4, size // 2, 2)
            y, x = rng.integers(0, size - h), rng.integers(0, size - w)
            masks[i, y:y + h, x:x + w] = True
    level = rng.random(masks.shape) * 0.85 + masks * rng.random(masks.shape) * 0.3
    grid = (0.5 + np.arange(levels) * 1e-7).astype(np.float32)
    maps = grid[np.minimum((level * levels).astype(np.int64), levels - 1)]
    scores = maps.reshape(images, -1).max(axis=1) + rng.normal(scale=1e-6, size=images).astype(np.float32)
    return scores, labels, maps, masks


def test_capacity_counts_distinct_scores_not_bins_per_class():
    """Normal and anomalous pixels share most scores: per-class bins exceed the capacity, distinct scores
    do not, so the result is exact (counting bins per class collapsed it: P-AP off by 3e-4)."""
    scores, labels, maps, masks = narrow_range_case(levels=3000)
    normal_distinct, anomalous_distinct = len(np.unique(maps[~masks])), len(np.unique(maps[masks]))
    distinct = len(np.unique(maps))
    capacity = distinct + 100
    assert normal_distinct + anomalous_distinct > capacity  # the per-class count would collapse
    result = accumulate(scores, labels, maps, masks, pixel_capacity=capacity).compute()
    assert result["resolution"]["pixel_shift"] == 0 and result["resolution"]["pixel_bins"] == distinct
    assert set(result["resolution"]["error_bounds"].values()) <= {0.0, 2.0**-32}  # the bound: exact
    assert_matches_references(result, scores, labels, maps, masks, tol=1e-9)  # well inside 1e-5


@pytest.mark.parametrize("extra", [-200, -1500])
def test_capacity_below_distinct_scores_stays_within_the_reported_bound(extra):
    """Fewer bins than distinct scores: neighbours merge (here ~12 pixels a score, so the error is not
    small), and the reported bound must hold."""
    scores, labels, maps, masks = narrow_range_case(levels=3000)
    capacity = len(np.unique(maps)) + extra
    result = accumulate(scores, labels, maps, masks, pixel_capacity=capacity).compute()
    resolution = result["resolution"]
    assert resolution["pixel_shift"] > 0 and resolution["pixel_bins"] <= capacity
    exact = dict(zip(PIXEL_NAMES, sklearn_metrics(masks, maps), strict=True))
    exact["AUPRO@0.3"] = exact_aupro(maps, masks)
    for name, value in exact.items():
        assert abs(result[name] - value) <= resolution["error_bounds"][name] + 1e-12, name


def version_1_state(acc: MetricAccumulator) -> dict:
    """The version-1 format (float32 keys) of a float32 accumulator at shift 0, as that version wrote it."""
    state = acc.state_dict()
    state["version"] = 1
    for name, hist in (("image_histogram", acc.image_hist), ("pixel_histogram", acc.pixel_hist)):
        hist.consolidate()
        old = {"capacity": hist.capacity, "shift": 0}
        for kind in ("normal", "anomalous"):
            bins = getattr(hist, kind)
            bits = decode_numpy(bins.keys).astype(np.float32).view(np.uint32)
            old[f"{kind}_keys"] = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
            old[f"{kind}_counts"] = bins.counts
        old["anomalous_overlap"] = hist.anomalous.overlap
        state[name] = old
    return state


def test_version_1_states_are_still_read():
    scores, labels, maps, masks = make_case("negative")
    acc = accumulate(scores, labels, maps, masks)
    old = version_1_state(acc)
    old["config"]["pixel_capacity"] = old["pixel_histogram"]["capacity"] = 1 << 20  # version 1's default:
    # read as today's, so that the shards of a job resumed across the upgrade merge
    restored = MetricAccumulator.from_state_dict(old)
    assert restored.config == acc.config
    assert restored.compute() == acc.compute()
    assert_same_histogram_state(restored.state_dict()["pixel_histogram"], acc.state_dict()["pixel_histogram"])
    restored.merge(acc)


def test_version_1_collapsed_state_converts_when_exact_and_refuses_otherwise():
    values = np.random.default_rng(0).random(3000).astype(np.float32) + 0.5  # positive normal floats
    for old_shift, data, ok in ((6, values, True), (6, -values, False)):
        bits = data.view(np.uint32)
        keys32 = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000)) >> np.uint32(old_shift)
        unique, counts = np.unique(keys32, return_counts=True)
        empty = np.zeros(0, dtype=np.int64)
        state = {"capacity": 1 << 16, "shift": old_shift, "normal_keys": unique.astype(np.uint32),
                 "normal_counts": counts.astype(np.int64), "anomalous_keys": empty.astype(np.uint32),
                 "anomalous_counts": empty, "anomalous_overlap": empty}
        if not ok:
            with pytest.raises(ValueError, match="cannot be converted exactly"):
                CollapsingHistogram.from_state_dict(state)
            continue
        hist = CollapsingHistogram.from_state_dict(state)
        new_shift = old_shift + FLOAT32_ZERO_BITS
        expected = np.unique(encode_numpy(data) >> np.uint64(new_shift), return_counts=True)
        assert hist.normal.shift == new_shift
        np.testing.assert_array_equal(hist.normal.keys, expected[0])
        np.testing.assert_array_equal(hist.normal.counts, expected[1])
