"""Reduce one batch of scored samples to ``BinCounts`` (numpy on CPU, torch on any device).

Inputs are flat: ``keys`` (order-preserving keys already shifted to the histogram's resolution: uint64
on the CPU, the signed int64 keys of ``encode_torch`` on a device),
``positive`` (anomalous sample or pixel) and, for AUPRO, ``region`` (connected-component id, 1..R, of
each anomalous pixel in order, unique within the batch) with ``region_sizes`` (pixels per id).

Per-region overlap without per-region histograms: PRO(t) = mean_r |{p in r : s_p >= t}| / |r| is a
sum over anomalous pixels of 1/|r|, so one weighted histogram suffices. To keep it exact and integer,
each region contributes at every key k the difference of floor(2**32 * tail(k) / |r|) between
consecutive occupied keys, where tail(k) counts the region's pixels with key >= k. Summed over the bins
above any threshold this telescopes to floor(2**32 * tail / |r|): the error is below 2**-32 of a
region at every threshold, at every resolution (coarser bins are sums of finer ones).
"""

from __future__ import annotations

import numpy as np
import torch

from residual_core.metrics.device_fold import DeviceBins
from residual_core.metrics.histogram import (
    MAX_REGION_PIXELS,
    OVERLAP_BITS,
    BinCounts,
    counts_of_keys,
    group_starts,
    segment_sums,
)


def _check_region_sizes(region_sizes: np.ndarray) -> None:
    if region_sizes.shape[0] and int(region_sizes[1:].max(initial=0)) > MAX_REGION_PIXELS:
        raise ValueError(f"a ground-truth region has {int(region_sizes[1:].max())} pixels; at most "
                         f"{MAX_REGION_PIXELS} are supported")


def reduce_anomalous(keys: np.ndarray, shift: int, region: np.ndarray, region_sizes: np.ndarray) -> BinCounts:
    """Anomalous pixels (uint64 keys at ``shift``, their region ids 1..R) -> counts and per-region overlap."""
    _check_region_sizes(region_sizes)
    unique_keys, rank = np.unique(keys, return_inverse=True)  # ranks < 2**32: they pack beside the region
    composite = np.sort((region.astype(np.uint64) << np.uint64(32)) | rank.reshape(-1).astype(np.uint64))
    starts = group_starts(composite)
    group_region = (composite[starts] >> np.uint64(32)).astype(np.int64)
    group_rank = (composite[starts] & np.uint64(0xFFFFFFFF)).astype(np.int64)
    region_first = np.searchsorted(composite >> np.uint64(32), group_region.astype(np.uint64), side="left")
    size = region_sizes[group_region].astype(np.int64)
    tail = size - (starts - region_first)  # region pixels with key >= this group's key
    scaled = (tail << OVERLAP_BITS) // size
    next_scaled = np.append(scaled[1:], 0)
    next_scaled[np.append(group_region[1:] != group_region[:-1], True)] = 0  # last group of a region
    contribution = scaled - next_scaled
    order = np.argsort(group_rank, kind="stable")  # every rank has a group: one segment per unique key
    counts = np.bincount(rank.reshape(-1), minlength=len(unique_keys)).astype(np.int64)
    overlap = segment_sums(contribution[order], group_starts(group_rank[order]))
    return BinCounts(shift, unique_keys, counts, overlap)


def reduce_numpy(keys: np.ndarray, positive: np.ndarray, shift: int, region: np.ndarray | None = None,
                 region_sizes: np.ndarray | None = None) -> tuple[BinCounts, BinCounts]:
    """CPU reduction to (normal, anomalous) bins; ``keys`` uint64 at ``shift``; ``region`` (ids of the
    positive samples, in order) and ``region_sizes`` enable the per-region overlap."""
    normal = counts_of_keys(keys[~positive], shift)
    if region is None:
        anomalous = counts_of_keys(keys[positive], shift)
        anomalous.overlap = np.zeros(len(anomalous), dtype=np.int64)
        return normal, anomalous
    return normal, reduce_anomalous(keys[positive], shift, region, region_sizes)


def reduce_torch(keys: torch.Tensor, positive: torch.Tensor, shift: int, region: torch.Tensor | None = None,
                 region_sizes: torch.Tensor | None = None) -> tuple[BinCounts, BinCounts]:
    """Device reduction (signed int64 keys of ``encode_torch``, shifted by ``shift``); only the compact
    result is copied to the host."""
    normal, anomalous = reduce_torch_bins(keys, positive, shift, region, region_sizes)
    return normal.to_host(), anomalous.to_host()


def reduce_torch_bins(keys: torch.Tensor, positive: torch.Tensor, shift: int,
                      region: torch.Tensor | None = None, region_sizes: torch.Tensor | None = None
                      ) -> tuple[DeviceBins, DeviceBins]:
    """``reduce_torch``, its result left on the keys' device (for ``device_fold.DeviceFold``)."""
    normal = DeviceBins(shift, *torch.unique(keys[~positive], sorted=True, return_counts=True))
    pos_keys = keys[positive]
    if region is None:
        pos_keys, pos_counts = torch.unique(pos_keys, sorted=True, return_counts=True)
        return normal, DeviceBins(shift, pos_keys, pos_counts, torch.zeros_like(pos_counts))
    _check_region_sizes(region_sizes.cpu().numpy())
    unique_key, rank = torch.unique(pos_keys, sorted=True, return_inverse=True)
    composite, group_count = torch.unique((region.to(torch.int64) << 32) | rank, sorted=True,
                                          return_counts=True)
    group_region = composite >> 32
    group_rank = composite & 0xFFFFFFFF
    group_start = torch.cumsum(group_count, 0) - group_count
    region_first_pixel = group_start[torch.searchsorted(group_region, group_region, side="left")]
    size = region_sizes.to(keys.device, torch.int64)[group_region]
    tail = size - (group_start - region_first_pixel)
    scaled = torch.div(tail << OVERLAP_BITS, size, rounding_mode="floor")
    next_scaled = torch.cat([scaled[1:], scaled.new_zeros(1)])
    last_of_region = torch.cat([group_region[1:] != group_region[:-1],
                                group_region.new_ones(1, dtype=torch.bool)])
    next_scaled[last_of_region] = 0
    contribution = scaled - next_scaled
    pos_counts = torch.zeros_like(unique_key).index_add_(0, group_rank, group_count)
    overlap = torch.zeros_like(unique_key).index_add_(0, group_rank, contribution)
    return normal, DeviceBins(shift, unique_key, pos_counts, overlap)
