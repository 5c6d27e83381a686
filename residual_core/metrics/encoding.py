"""Order-preserving float32 -> uint32 key encoding (numpy and torch).

Comparing keys as unsigned integers gives the same order as comparing the floats, so a histogram over
keys is a histogram over scores with no assumed range: any scale, sign or outlier maps to a key, and
equal floats (including -0.0 and +0.0) map to the same key. Dropping low key bits (``key >> shift``)
merges neighbouring floats into one bin with a fixed *relative* width, which is how a full histogram
collapses when it would exceed its capacity.
"""

from __future__ import annotations

import numpy as np
import torch

SIGN_BIT = np.uint32(0x80000000)
KEY_BITS = 32
NEGATIVE_ZERO_KEY = np.uint32(0x7FFFFFFF)  # -0.0 would land just below +0.0 (0x80000000)
LOWEST_NUMBER_KEY = 0x007FFFFF  # -inf; negative NaNs encode below it
HIGHEST_NUMBER_KEY = 0xFF800000  # +inf; positive NaNs encode above it


def _reject_nan(min_key: int, max_key: int, what: str) -> None:
    if min_key < LOWEST_NUMBER_KEY or max_key > HIGHEST_NUMBER_KEY:
        raise ValueError(f"{what} contains NaN; scores must be numbers (±inf is allowed)")


def encode_numpy(scores: np.ndarray, what: str = "scores") -> np.ndarray:
    """float scores (any shape) -> flat uint32 keys with the same order. Scores are evaluated as float32."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).reshape(-1).view(np.uint32)
    keys = bits >> np.uint32(31)
    np.negative(keys, out=keys)  # all ones for negative floats, zero otherwise
    keys |= SIGN_BIT
    keys ^= bits  # negative: ~bits (reverses their order); positive: bits with the sign bit set
    if keys.shape[0]:
        _reject_nan(int(keys.min()), int(keys.max()), what)
        keys[keys == NEGATIVE_ZERO_KEY] = SIGN_BIT  # -0.0 ties with +0.0, as the floats do
    return keys


def decode_numpy(keys: np.ndarray) -> np.ndarray:
    """uint32 keys (shift 0) -> float32 scores; the inverse of ``encode_numpy``."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys >= SIGN_BIT, keys & ~SIGN_BIT, ~keys)
    return bits.view(np.float32)


def encode_torch(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    """float tensor (any shape, any device) -> flat int64 keys in [0, 2**32) with the same order."""
    flat = scores.detach().reshape(-1).to(torch.float32) + 0.0  # -0.0 -> +0.0
    bits = flat.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    keys = torch.where(bits >= 0x80000000, (~bits) & 0xFFFFFFFF, bits | 0x80000000)
    if keys.numel():
        _reject_nan(int(keys.min()), int(keys.max()), what)
    return keys
