"""Folding reduced batches on the device gives the host fold's state bit for bit.

The device path runs on whatever device the maps are on; here it runs on CPU tensors (the accumulator's
device switch patched to take them), on a CUDA device in the GPU check."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from residual_core.metrics import MetricAccumulator
from residual_core.metrics import accumulator as accumulator_module
from residual_core.metrics.device_fold import bit_lengths_torch, extra_shift_to_fit_device
from residual_core.metrics.encoding import encode_numpy, encode_torch
from residual_core.metrics.histogram import bit_lengths, extra_shift_to_fit
from tests.residual_core.metrics.references import assert_same_histogram_state
from tests.residual_core.metrics.test_accumulator import accumulate, make_case

SMALL_CAPACITIES = (1 << 21, 1 << 9, 40)  # the default (no collapse), collapses on the device, many collapses


@pytest.fixture
def cpu_tensors_reduced_as_on_a_device(monkeypatch):
    """Route CPU tensor maps through the device reduction and fold (numpy maps keep the host path)."""
    monkeypatch.setattr(accumulator_module, "_reduces_on_device", lambda maps: isinstance(maps, torch.Tensor))


def device_accumulate(scores, labels, maps, masks, batch: int = 5, device: str = "cpu", **kwargs):
    acc = MetricAccumulator(**kwargs)
    for start in range(0, len(labels), batch):
        rows = slice(start, start + batch)
        acc.update(scores[rows], labels[rows], torch.from_numpy(maps[rows]).to(device), masks[rows])
    return acc


def assert_same_state(acc: MetricAccumulator, expected: MetricAccumulator) -> None:
    state, want = acc.state_dict(), expected.state_dict()
    assert state["counts"] == want["counts"]
    assert_same_histogram_state(state["pixel_histogram"], want["pixel_histogram"])
    assert_same_histogram_state(state["image_histogram"], want["image_histogram"])


@pytest.mark.usefixtures("cpu_tensors_reduced_as_on_a_device")
@pytest.mark.parametrize("capacity", SMALL_CAPACITIES)
@pytest.mark.parametrize("kind", ["random", "outliers", "negative", "heavy_ties", "many_tiny_regions"])
def test_device_fold_gives_the_host_state(kind, capacity):
    scores, labels, maps, masks = make_case(kind, images=15)
    expected = accumulate(scores, labels, maps, masks, batch=2, pixel_capacity=capacity)
    acc = device_accumulate(scores, labels, maps, masks, batch=2, pixel_capacity=capacity)
    if capacity == 40:
        assert expected.pixel_hist.shift > 0  # the case collapses
    assert_same_state(acc, expected)
    assert acc.compute() == expected.compute()


@pytest.mark.usefixtures("cpu_tensors_reduced_as_on_a_device")
@pytest.mark.parametrize("capacity", SMALL_CAPACITIES)
def test_float64_maps_fold_on_the_device_as_on_the_host(capacity):
    scores, labels, maps, masks = make_case("random", images=15)
    maps = maps.astype(np.float64) + np.random.default_rng(3).integers(0, 4, size=maps.shape) * 1e-13
    expected = accumulate(scores, labels, maps, masks, batch=4, pixel_capacity=capacity)
    assert_same_state(device_accumulate(scores, labels, maps, masks, batch=4, pixel_capacity=capacity),
                      expected)


@pytest.mark.usefixtures("cpu_tensors_reduced_as_on_a_device")
@pytest.mark.parametrize("capacity", SMALL_CAPACITIES)
def test_host_and_device_batches_mix_in_one_accumulator(capacity):
    """Batches alternately on the host (dense window) and the device: still the one-pass state."""
    scores, labels, maps, masks = make_case("random", images=18)
    expected = accumulate(scores, labels, maps, masks, batch=3, pixel_capacity=capacity)
    acc = MetricAccumulator(pixel_capacity=capacity)
    for number, start in enumerate(range(0, 18, 3)):
        rows = slice(start, start + 3)
        batch_maps = torch.from_numpy(maps[rows]) if number % 2 else maps[rows]
        acc.update(scores[rows], labels[rows], batch_maps, masks[rows])
    assert_same_state(acc, expected)


@pytest.mark.usefixtures("cpu_tensors_reduced_as_on_a_device")
def test_pending_device_bins_reach_merges_and_pickles():
    scores, labels, maps, masks = make_case("random", images=12)
    expected = accumulate(scores, labels, maps, masks, batch=3, pixel_capacity=1 << 9)
    first = device_accumulate(scores[:6], labels[:6], maps[:6], masks[:6], batch=3, pixel_capacity=1 << 9)
    second = device_accumulate(scores[6:], labels[6:], maps[6:], masks[6:], batch=3, pixel_capacity=1 << 9)
    travelled = pickle.loads(pickle.dumps(second))
    assert travelled._device_pixels is None  # no tensors travel
    assert_same_state(first.merge(travelled), expected)


def test_bit_lengths_on_the_device_equal_the_host_ones():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.integers(0, 1 << 64, size=500, dtype=np.uint64),
                             np.array([0, 1, 2, 3, (1 << 32) - 1, 1 << 32, (1 << 64) - 1], dtype=np.uint64)])
    values = np.concatenate([values, values >> rng.integers(0, 64, size=len(values)).astype(np.uint64)])
    got = bit_lengths_torch(torch.from_numpy(values.view(np.int64))).numpy()
    np.testing.assert_array_equal(got, bit_lengths(values))


@pytest.mark.parametrize("shift", [0, 1, 29, 40, 62])
def test_device_shift_to_fit_equals_the_host_one(shift):
    rng = np.random.default_rng(shift)
    scores = np.concatenate([rng.normal(size=3000), -rng.exponential(size=3000) * 1e6, [0.0, 1e300, -1e300]])
    keys = np.unique(encode_numpy(scores) >> np.uint64(shift))
    signed = torch.unique(encode_torch(torch.from_numpy(scores)) >> shift)
    for capacity in (len(keys), len(keys) - 1, 1000, 17, 2):
        assert extra_shift_to_fit_device(signed, shift, capacity) == extra_shift_to_fit(keys, capacity)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("capacity", SMALL_CAPACITIES)
def test_cuda_batches_fold_on_the_device_with_identical_state(capacity):
    scores, labels, maps, masks = make_case("many_tiny_regions", images=15)
    expected = accumulate(scores, labels, maps, masks, batch=2, pixel_capacity=capacity)
    acc = device_accumulate(scores, labels, maps, masks, batch=2, device="cuda", pixel_capacity=capacity)
    assert acc._device_pixels is not None and len(acc._device_pixels.normal)  # folded on the device so far
    assert_same_state(acc, expected)
