"""The torch (GPU) reduction gives exactly the numpy reduction, checked here on CPU tensors."""

import numpy as np
import pytest
import torch

from residual_core.metrics.encoding import encode_numpy, encode_torch
from residual_core.metrics.reduce import reduce_numpy, reduce_torch
from residual_core.metrics.regions import anomalous_pixel_regions


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shift", [0, 9, 35])
def test_torch_and_numpy_reductions_agree(shift, dtype):
    rng = np.random.default_rng(0)
    masks = rng.random((4, 20, 20)) < 0.25
    maps = np.round(rng.normal(size=masks.shape) + masks, 2).astype(dtype)
    if dtype == np.float64:  # ties in float32, distinct in float64
        maps += rng.integers(0, 3, size=maps.shape) * 1e-12
    regions, sizes = anomalous_pixel_regions(masks)
    expected = reduce_numpy(encode_numpy(maps) >> np.uint64(shift), masks.reshape(-1), shift, regions, sizes)
    got = reduce_torch(encode_torch(torch.from_numpy(maps)) >> shift, torch.from_numpy(masks.reshape(-1)),
                       shift, torch.from_numpy(regions), torch.from_numpy(sizes))
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(want.keys, have.keys)
        np.testing.assert_array_equal(want.counts, have.counts)
        if want.overlap is not None:
            np.testing.assert_array_equal(want.overlap, have.overlap)


def test_overlap_of_every_region_sums_to_one_region():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 16, 16)) < 0.2
    regions, sizes = anomalous_pixel_regions(masks)
    maps = rng.normal(size=masks.shape).astype(np.float32)
    _, anomalous = reduce_numpy(encode_numpy(maps), masks.reshape(-1), 0, regions, sizes)
    assert anomalous.overlap.sum() == (len(sizes) - 1) * 2**32  # the telescoping floors are exact at the end
    assert anomalous.counts.sum() == masks.sum()
