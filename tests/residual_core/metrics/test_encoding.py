"""Order-preserving float64 -> uint64 keys."""

import numpy as np
import pytest
import torch

from residual_core.metrics.encoding import (
    FLOAT32_ZERO_BITS,
    decode_float32_keys,
    decode_numpy,
    encode_numpy,
    encode_torch,
    torch_keys_to_numpy,
)


def special_values(dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(0)
    specials = [-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1e-38, 1.0, 1.0000001, 3e38, np.inf]
    if dtype == np.float64:  # below float32 resolution, subnormal and beyond the float32 range
        specials += [1.0 + 1e-12, 1.0 + 2e-12, -1.0 - 1e-12, 5e-324, -5e-324, 1e300, -1e300, 1.7e308]
    spread = rng.normal(size=500) * 10.0 ** rng.integers(-30, 30, 500)
    return np.concatenate([specials, spread]).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keys_preserve_order_and_ties(dtype):
    values = special_values(dtype)
    keys = encode_numpy(values)
    assert keys.dtype == np.uint64
    order_by_value = np.argsort(values, kind="stable")
    assert np.all(np.diff(keys[order_by_value].astype(np.int64)) >= 0)
    equal_values = values[:, None] == values[None, :]
    equal_keys = keys[:, None] == keys[None, :]
    np.testing.assert_array_equal(equal_values, equal_keys)  # -0.0 and +0.0 tie, like the floats


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_decode_inverts_encode(dtype):
    values = special_values(dtype)
    decoded = decode_numpy(encode_numpy(values))
    assert decoded.dtype == np.float64
    np.testing.assert_array_equal(decoded, values.astype(np.float64) + 0.0)


def test_float32_keys_end_in_zero_bits_whatever_the_sign():
    keys = encode_numpy(special_values(np.float32))
    assert not np.any(keys & np.uint64((1 << FLOAT32_ZERO_BITS) - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_torch_encoding_matches_numpy(dtype):
    tensor = torch.from_numpy(special_values(np.float64)).to(dtype)
    expected = encode_numpy(tensor.double().numpy())
    for shift in (0, 1, 29, 40, 63):
        keys = encode_torch(tensor) >> shift
        np.testing.assert_array_equal(torch_keys_to_numpy(keys, shift), expected >> np.uint64(shift))


def test_version_1_float32_keys_decode():
    values = special_values(np.float32)
    bits = values.view(np.uint32)
    keys32 = np.where(bits >> 31 == 1, ~bits, bits | np.uint32(0x80000000))
    np.testing.assert_array_equal(decode_float32_keys(keys32), values)


def test_nan_is_rejected_with_the_name():
    with pytest.raises(ValueError, match="anomaly_maps contains NaN"):
        encode_numpy(np.array([0.0, np.nan]), "anomaly_maps")
    with pytest.raises(ValueError, match="NaN"):
        encode_torch(torch.tensor([np.nan]))
