"""Folding a histogram's reduced batches on the device that reduced them (GPU actors).

A GPU actor reduces each batch's pixels on its device (``reduce.reduce_torch_bins``): a few million
compact (key, count) bins per shard. Summing those on the host meant sort-merging millions of keys per
shard on the actor's one CPU, most of a GPU actor's time per image. ``DeviceFold`` keeps them on the
device, sums them there and collapses them to the histogram's capacity with the host's rule (the
smallest shift at which the union of normal and anomalous keys fits), and hands the host one compact
pair when the histogram is read. A histogram's state depends only on the multiset of its samples and
its collapses always pick the smallest shift at which all data seen fits, so the host state is the same,
bit for bit, as when every batch is folded on the host (``tests/residual_core/metrics/test_device_fold.py``).

Keys are the signed int64 keys of ``encode_torch`` shifted right (arithmetically) by the bins' shift:
``unsigned >> s = (signed >> s) + 2**(63 - s)``, so order, equality and coarsening carry over, and the
XOR of two keys equals their unsigned keys' XOR on the low ``64 - s`` bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from residual_core.metrics.encoding import torch_keys_to_numpy
from residual_core.metrics.histogram import BIT_LENGTH_BINS, MAX_SHIFT, BinCounts, shift_from_bit_lengths

LOW_HALF = 0xFFFFFFFF
FOLD_AT_CAPACITIES = 2  # pending bins are folded once they reach this many capacities


@dataclass
class DeviceBins:
    """``histogram.BinCounts`` as tensors on a device: sorted unique signed keys at ``shift``."""

    shift: int
    keys: torch.Tensor  # int64
    counts: torch.Tensor  # int64, >= 1
    overlap: torch.Tensor | None = None  # int64, anomalous bins only

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def coarsen(self, shift: int) -> DeviceBins:
        """The same counts at a coarser ``shift`` (neighbouring bins summed)."""
        if shift < self.shift:
            raise ValueError(f"cannot refine device bins from shift {self.shift} to {shift}")
        if shift == self.shift:
            return self
        keys, inverse = torch.unique_consecutive(self.keys >> (shift - self.shift), return_inverse=True)
        overlap = None if self.overlap is None else _sum_by(self.overlap, inverse, len(keys))
        return DeviceBins(shift, keys, _sum_by(self.counts, inverse, len(keys)), overlap)

    def to_host(self) -> BinCounts:
        overlap = None if self.overlap is None else self.overlap.cpu().numpy().astype(np.int64)
        return BinCounts(self.shift, torch_keys_to_numpy(self.keys, self.shift),
                         self.counts.cpu().numpy().astype(np.int64), overlap)


def _sum_by(values: torch.Tensor, inverse: torch.Tensor, size: int) -> torch.Tensor:
    """Integer sums of ``values`` by target index (exact in any order, so deterministic on any device)."""
    return torch.zeros(size, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)


def combine_device(parts: list[DeviceBins]) -> DeviceBins:
    """Sum of bins of one kind (normal or anomalous), brought to the coarsest shift among them."""
    shift = max(p.shift for p in parts)
    parts = [p.coarsen(shift) for p in parts]
    if len(parts) == 1:
        return parts[0]
    keys, inverse = torch.unique(torch.cat([p.keys for p in parts]), sorted=True, return_inverse=True)
    counts = _sum_by(torch.cat([p.counts for p in parts]), inverse, len(keys))
    overlap = None
    if parts[0].overlap is not None:
        overlap = _sum_by(torch.cat([p.overlap for p in parts]), inverse, len(keys))
    return DeviceBins(shift, keys, counts, overlap)


def bit_lengths_torch(values: torch.Tensor) -> torch.Tensor:
    """Significant bits of each int64 read as unsigned 64 bits (0 for 0), exactly: as
    ``histogram.bit_lengths``, from the high and low 32-bit halves (float64 is exact below 2**53)."""
    high = (values >> 32) & LOW_HALF
    has_high = high > 0
    part = torch.where(has_high, high, values & LOW_HALF).to(torch.float64)
    return torch.frexp(part).exponent.to(torch.int64) + 32 * has_high


def extra_shift_to_fit_device(keys: torch.Tensor, shift: int, capacity: int) -> int:
    """``histogram.extra_shift_to_fit`` of sorted unique signed keys at ``shift``, on their device."""
    if len(keys) <= capacity:
        return 0
    apart = keys[1:] ^ keys[:-1]
    if shift:  # the unsigned keys have 64 - shift bits; the signed ones' sign extension is not theirs
        apart &= (1 << (64 - shift)) - 1
    lengths = torch.bincount(bit_lengths_torch(apart), minlength=BIT_LENGTH_BINS)
    return shift_from_bit_lengths(lengths.cpu().numpy(), capacity)


class DeviceFold:
    """A histogram's batches reduced on a device, not yet handed to the host histogram: summed and
    collapsed there once their bins reach ``FOLD_AT_CAPACITIES`` capacities, so device memory stays a few
    times the capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self.normal: list[DeviceBins] = []
        self.anomalous: list[DeviceBins] = []

    @property
    def shift(self) -> int:
        """The coarsest shift among the pending bins (0 when there are none)."""
        return max((p.shift for p in self.normal + self.anomalous), default=0)

    def __len__(self) -> int:
        """Pending bins (an upper bound on their distinct keys)."""
        return sum(len(p) for p in self.normal + self.anomalous)

    def add(self, normal: DeviceBins, anomalous: DeviceBins) -> None:
        self.normal.append(normal)
        self.anomalous.append(anomalous)
        if len(self) >= FOLD_AT_CAPACITIES * self.capacity and len(self.normal) > 1:
            self.fold()

    def fold(self) -> None:
        """Sum the pending bins on the device; collapse them if their union exceeds the capacity."""
        if not self.normal:
            return
        normal, anomalous = combine_device(self.normal), combine_device(self.anomalous)
        shift = max(normal.shift, anomalous.shift)
        normal, anomalous = normal.coarsen(shift), anomalous.coarsen(shift)
        if len(normal) + len(anomalous) > self.capacity:
            union = torch.unique(torch.cat([normal.keys, anomalous.keys]), sorted=True)
            extra = extra_shift_to_fit_device(union, shift, self.capacity)
            if extra:
                shift = min(MAX_SHIFT, shift + extra)
                normal, anomalous = normal.coarsen(shift), anomalous.coarsen(shift)
        self.normal, self.anomalous = [normal], [anomalous]

    def take(self) -> tuple[BinCounts, BinCounts] | None:
        """The pending bins, folded, as host ``BinCounts`` (normal, anomalous); None when there are none.
        Nothing stays pending."""
        if not self.normal:
            return None
        self.fold()
        normal, anomalous = self.normal[0].to_host(), self.anomalous[0].to_host()
        self.normal, self.anomalous = [], []
        return normal, anomalous
