"""Order-preserving float32 -> uint32 keys."""

import numpy as np
import pytest
import torch

from residual_core.metrics.encoding import decode_numpy, encode_numpy, encode_torch


def special_values() -> np.ndarray:
    rng = np.random.default_rng(0)
    specials = [-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 1.0000001, 3e38, np.inf]
    spread = rng.normal(size=500) * 10.0 ** rng.integers(-30, 30, 500)
    return np.concatenate([specials, spread]).astype(np.float32)


def test_keys_preserve_order_and_ties():
    values = special_values()
    keys = encode_numpy(values)
    assert keys.dtype == np.uint32
    order_by_value = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order_by_value].astype(np.int64)) >= 0)
    equal_values = values[:, None] == values[None, :]
    equal_keys = keys[:, None] == keys[None, :]
    np.testing.assert_array_equal(equal_values, equal_keys)  # -0.0 and +0.0 tie, like the floats


def test_decode_inverts_encode():
    values = special_values()
    decoded = decode_numpy(encode_numpy(values))
    np.testing.assert_array_equal(decoded, values + np.float32(0.0))


def test_torch_encoding_matches_numpy():
    values = special_values()
    expected = encode_numpy(values).astype(np.int64)
    np.testing.assert_array_equal(encode_torch(torch.from_numpy(values)).numpy(), expected)


def test_nan_is_rejected_with_the_name():
    with pytest.raises(ValueError, match="anomaly_maps contains NaN"):
        encode_numpy(np.array([0.0, np.nan]), "anomaly_maps")
    with pytest.raises(ValueError, match="NaN"):
        encode_torch(torch.tensor([np.nan]))
