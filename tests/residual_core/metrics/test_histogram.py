"""CollapsingHistogram: exact below capacity, deterministic collapse, order-independent merges."""

import numpy as np
import pytest

from residual_core.metrics.encoding import FLOAT32_ZERO_BITS, encode_numpy
from residual_core.metrics.histogram import (
    BinCounts,
    CollapsingHistogram,
    combine,
    counts_of_keys,
    segment_sums,
    sort_unsigned,
)
from residual_core.metrics.reduce import reduce_numpy
from tests.residual_core.metrics.references import assert_same_histogram_state


def histogram_of(values: np.ndarray, positive: np.ndarray, capacity: int, chunk: int) -> CollapsingHistogram:
    hist = CollapsingHistogram(capacity)
    for start in range(0, len(values), chunk):
        keys = encode_numpy(values[start:start + chunk]) >> np.uint64(hist.shift)
        hist.add(*reduce_numpy(keys, positive[start:start + chunk], hist.shift))
    return hist.consolidate()


def test_exact_counts_below_capacity():
    values = np.array([3.0, -1.0, 3.0, 0.5, -1.0, 3.0], dtype=np.float32)
    positive = np.array([1, 0, 0, 1, 0, 1], dtype=bool)
    aligned = histogram_of(values, positive, capacity=16, chunk=4).aligned()
    assert aligned.shift == 0
    np.testing.assert_array_equal(aligned.negatives, [2, 0, 1])  # keys ascend with value: -1, 0.5, 3
    np.testing.assert_array_equal(aligned.positives, [0, 1, 2])


def test_collapse_is_the_smallest_shift_that_fits_whatever_the_chunking():
    rng = np.random.default_rng(0)
    values = rng.normal(size=5000).astype(np.float32)
    positive = rng.random(5000) < 0.3
    states = [histogram_of(values, positive, 256, chunk).state_dict() for chunk in (7, 100, 5000)]
    for state in states[1:]:
        assert_same_histogram_state(state, states[0])
    shift = states[0]["shift"]
    assert shift > 0 and len(states[0]["normal_counts"]) <= 256  # distinct keys of both classes together
    finer = CollapsingHistogram(10**6)
    finer.add(*reduce_numpy(encode_numpy(values) >> np.uint64(shift - 1), positive, shift - 1))
    assert finer.shift == shift - 1
    assert len(finer.aligned()) > 256  # one bit finer would not fit


def test_coarsen_refuses_to_refine_and_segment_sums_are_exact():
    bins = BinCounts(3, np.array([1, 2], dtype=np.uint64), np.array([1, 1]))
    with pytest.raises(ValueError, match="refine"):
        bins.coarsen(2)
    big = np.array([2**62, 2**62 - 1, 5], dtype=np.int64)
    np.testing.assert_array_equal(segment_sums(big, np.array([0, 2])), [2**63 - 1, 5])
    merged = combine([bins, BinCounts(4, np.array([1], dtype=np.uint64), np.array([4]))])
    assert merged.shift == 4 and merged.keys.tolist() == [0, 1] and merged.counts.tolist() == [1, 5]


def test_bad_state_and_capacity_are_rejected():
    with pytest.raises(ValueError, match="capacity"):
        CollapsingHistogram(1)
    state = histogram_of(np.arange(10, dtype=np.float32), np.arange(10) % 2 == 0, 64, 10).state_dict()
    state["key_steps"] = {**state["key_steps"], "small": state["key_steps"]["small"].copy()}
    state["key_steps"]["small"][3] = 0  # a repeated key
    with pytest.raises(ValueError, match="sorted"):
        CollapsingHistogram.from_state_dict(state)
    with pytest.raises(ValueError, match="capacity"):
        CollapsingHistogram(4).merged(CollapsingHistogram(8))


@pytest.mark.parametrize("capacity", [64, 4096])
def test_dense_window_and_sparse_paths_give_the_same_state(capacity):
    """bincount window, sorted sparse counts or a mix (as with device batches): one canonical state."""
    rng = np.random.default_rng(2)
    chunks = [np.concatenate([rng.normal(size=300), rng.choice([1e30, -1e-30], 5)]).astype(np.float32)
              for _ in range(6)]
    states = []
    for route in ("window", "float32 window", "sparse", "mixed"):
        hist = CollapsingHistogram(capacity)
        for i, chunk in enumerate(chunks):
            shift = hist.shift
            keys = encode_numpy(chunk) >> np.uint64(shift)
            if route == "window" or (route == "mixed" and i % 2):
                hist.add_normal_keys(keys, shift)
            elif route == "float32 window":  # slots of one float32 value while the shift is below 29
                hist.add_normal_keys(keys, shift, zero_bits=FLOAT32_ZERO_BITS)
            else:
                hist.add(counts_of_keys(keys, shift), None)
        states.append(hist.state_dict())
    for state in states[1:]:
        assert_same_histogram_state(state, states[0])


@pytest.mark.parametrize("case", ["float32 scores", "float64 scores", "float32 at shift 3", "one value",
                                  "spans over 32 bits", "few keys", "none"])
def test_counts_of_keys_are_the_unique_keys_and_their_counts(case):
    """Keys that fit 32 bits past their shared zero bits are sorted as uint32 offsets; the rest as they
    are. Either way: the sorted unique keys and how often each occurs."""
    rng = np.random.default_rng(0)
    scores = rng.gamma(2.0, 0.5, size=20_000)
    scores[::7] = scores[3]  # repeated values
    shift = 0
    if case == "float32 scores":
        keys = encode_numpy(scores.astype(np.float32))
    elif case == "float64 scores":
        keys = encode_numpy(scores)
    elif case == "float32 at shift 3":
        shift = 3
        keys = encode_numpy(scores.astype(np.float32)) >> np.uint64(shift)
    elif case == "one value":
        keys = np.full(5_000, encode_numpy(np.array([0.25]))[0], dtype=np.uint64)
    elif case == "spans over 32 bits":
        keys = encode_numpy(np.concatenate([scores, -scores, [1e30, -1e-30]]).astype(np.float32))
    elif case == "few keys":
        keys = encode_numpy(scores[:50].astype(np.float32))
    else:
        keys = np.zeros(0, dtype=np.uint64)
    unique, counts = np.unique(keys, return_counts=True)
    bins = counts_of_keys(keys.copy(), shift)
    assert bins.shift == shift and bins.keys.dtype == np.uint64 and bins.counts.dtype == np.int64
    np.testing.assert_array_equal(bins.keys, unique)
    np.testing.assert_array_equal(bins.counts, counts)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("size", [0, 100, 50_000])
def test_sort_unsigned_is_numpys_sort(dtype, size):
    """torch sorts signed integers: values with the top bit set (above the signed range) must still come
    last, and the extremes, repeats and small arrays (numpy's own sort) come out as ``np.sort`` has them."""
    rng = np.random.default_rng(1)
    top = np.iinfo(dtype).max
    values = rng.integers(0, top, size=size, dtype=dtype, endpoint=True)
    values[: size // 10] = values[size // 10 : 2 * (size // 10)]  # repeats
    if size:
        values[:4] = [0, top, top // 2, top // 2 + 1]  # both ends, and both sides of the signed boundary
    before = values.copy()
    ordered = sort_unsigned(values)
    assert ordered.dtype == values.dtype
    np.testing.assert_array_equal(ordered, np.sort(before))
    np.testing.assert_array_equal(values, before)  # a sorted copy: the input is left as it was


@pytest.mark.parametrize("top", [4, 60, 10**6])
def test_aligned_bins_place_both_classes_on_the_sorted_union(top):
    """`aligned` places the anomalous keys among the normal ones by binary search; the result is the
    sorted union with each class's counts (0 where absent): keys shared, anomalous-only keys below, between
    and above the normal ones, either class empty."""
    rng = np.random.default_rng(top)
    for _ in range(200):
        normal_keys = np.unique(rng.integers(0, top, rng.integers(0, 40)).astype(np.uint64))
        anomalous_keys = np.unique(rng.integers(0, top, rng.integers(0, 40)).astype(np.uint64))
        normal = BinCounts(0, normal_keys, rng.integers(1, 9, len(normal_keys)))
        anomalous = BinCounts(0, anomalous_keys, rng.integers(1, 9, len(anomalous_keys)),
                              rng.integers(0, 9, len(anomalous_keys)))
        bins = CollapsingHistogram(10**6, normal, anomalous).aligned()
        union = np.union1d(normal_keys, anomalous_keys)
        assert np.array_equal(bins.keys, union) and bins.keys.dtype == np.uint64
        for values, part in ((bins.negatives, normal), (bins.positives, anomalous)):
            expected = np.zeros(len(union), dtype=np.int64)
            expected[np.searchsorted(union, part.keys)] = part.counts
            assert np.array_equal(values, expected)
        expected = np.zeros(len(union), dtype=np.int64)
        expected[np.searchsorted(union, anomalous.keys)] = anomalous.overlap
        assert np.array_equal(bins.overlap, expected)
