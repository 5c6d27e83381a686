"""Order-preserving float64 -> uint64 key encoding (numpy and torch).

Comparing keys as unsigned integers gives the same order as comparing the floats, so a histogram over
keys is a histogram over scores with no assumed range: any scale, sign or outlier maps to a key, and
equal floats (including -0.0 and +0.0) map to the same key. Every input is evaluated as float64:
float32, float16 and bfloat16 convert to float64 exactly, so distinct inputs keep distinct keys
whatever their precision. Dropping low key bits (``key >> shift``) merges neighbouring floats into one
bin with a fixed *relative* width, which is how a full histogram collapses when it would exceed its
capacity.

Encoding: positive floats (+0.0 included) set the sign bit of their bits; negative floats are negated
as unsigned integers (``2**64 - bits``), which reverses their order and sends -0.0 onto +0.0. A
float32 (or narrower) value has at most 24 significant bits, so its key has the low
``FLOAT32_ZERO_BITS`` bits clear whatever its sign: the histogram's dense window relies on that.
"""

from __future__ import annotations

import numpy as np
import torch

SIGN_BIT = np.uint64(1 << 63)
KEY_BITS = 64
FLOAT32_ZERO_BITS = 29  # 52 - 23 mantissa bits: keys of float32-representable values end in 29 zeros
LOWEST_NUMBER_KEY = (1 << 64) - 0xFFF0000000000000  # -inf; negative NaNs encode below it
HIGHEST_NUMBER_KEY = 0xFFF0000000000000  # +inf; positive NaNs encode above it
_TORCH_OFFSET = 1 << 63  # torch keys are signed: key - 2**63 (int64 has no unsigned twin on devices)


def _reject_nan(min_key: int, max_key: int, what: str) -> None:
    if min_key < LOWEST_NUMBER_KEY or max_key > HIGHEST_NUMBER_KEY:
        raise ValueError(f"{what} contains NaN; scores must be numbers (±inf is allowed)")


def as_float_array(values, what: str = "scores") -> np.ndarray:
    """numpy array of floats (float16/32/64 kept; integers and bools become float64); torch tensors,
    bfloat16 included, are converted exactly."""
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.dtype == torch.bfloat16:  # numpy has no bfloat16; bf16 -> fp32 is exact
            values = values.float()
        values = values.cpu().numpy()
    values = np.asarray(values)
    if values.dtype.kind == "f" and values.dtype.itemsize > 8:
        raise ValueError(f"{what}: {values.dtype} scores are not supported (float64 at most)")
    if values.dtype.kind not in "fiub":
        raise ValueError(f"{what} must be numbers, got dtype {values.dtype}")
    return values


def encode_numpy(scores, what: str = "scores") -> np.ndarray:
    """Float scores (any shape, float16/32/64 or integers) -> flat uint64 keys with the same order."""
    values = as_float_array(scores, what)
    bits = values.astype(np.float64).reshape(-1).view(np.uint64)  # astype copies: safe to modify
    negative = bits >= SIGN_BIT  # -0.0 included
    bits ^= SIGN_BIT  # positive: bits with the sign bit set
    if negative.any():  # negative: 2**64 - bits = -(bits ^ S) ^ S (order reversed; -0.0 lands on +0.0)
        np.negative(bits, out=bits, where=negative)
        np.bitwise_xor(bits, SIGN_BIT, out=bits, where=negative)
    if bits.shape[0]:
        _reject_nan(int(bits.min()), int(bits.max()), what)
    return bits


def decode_numpy(keys: np.ndarray) -> np.ndarray:
    """uint64 keys (shift 0) -> float64 scores; the inverse of ``encode_numpy`` (-0.0 decodes as +0.0)."""
    keys = np.asarray(keys, dtype=np.uint64)
    bits = np.where(keys >= SIGN_BIT, keys ^ SIGN_BIT, np.negative(keys))
    return bits.view(np.float64)


def encode_torch(scores: torch.Tensor, what: str = "scores") -> torch.Tensor:
    """Float tensor (any shape, any device, bfloat16 included) -> flat int64 keys ``key - 2**63``.

    Same order as ``encode_numpy``'s keys, as signed integers (torch lacks uint64 arithmetic);
    ``key = signed + 2**63`` and ``key >> s = (signed >> s) + 2**(63 - s)`` (arithmetic shift), see
    ``torch_keys_to_numpy``.
    """
    flat = scores.detach().reshape(-1).to(torch.float64) + 0.0  # -0.0 -> +0.0
    bits = flat.view(torch.int64)
    keys = torch.where(bits >= 0, bits, (-bits) ^ torch.iinfo(torch.int64).min)
    if keys.numel():
        low, high = int(keys.min()), int(keys.max())
        _reject_nan(low + _TORCH_OFFSET, high + _TORCH_OFFSET, what)
    return keys


def torch_keys_to_numpy(keys: torch.Tensor, shift: int) -> np.ndarray:
    """Signed torch keys already shifted right by ``shift`` -> uint64 keys ``encode_numpy(x) >> shift``."""
    signed = keys.cpu().numpy().astype(np.int64, copy=False)
    return signed.view(np.uint64) + np.uint64(1 << (63 - shift))  # wraps modulo 2**64 into [0, 2**(64-s))


def shift_keys(keys: np.ndarray, shift: int) -> np.ndarray:
    """``keys >> shift`` for uint64 keys, in place (0 <= shift < 64)."""
    if shift:
        np.right_shift(keys, np.uint64(shift), out=keys)
    return keys


def decode_float32_keys(keys: np.ndarray) -> np.ndarray:
    """Keys of the version-1 state format (order-preserving float32 -> uint32, shift 0) -> float32."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys >= np.uint32(0x80000000), keys & np.uint32(0x7FFFFFFF), ~keys)
    return bits.view(np.float32)
