"""Bounded, mergeable score histograms over order-preserving keys.

``BinCounts`` holds, per occupied bin (sorted unique uint64 ``keys`` at a given ``shift``), a sample
count and, for anomalous pixels, the per-region overlap numerator used by AUPRO (integer units of
``2**-OVERLAP_BITS`` of a region). Normal and anomalous samples are kept apart because anomalous ones
are few: the large normal part carries one value array only. Everything is an integer, so adding counts
is associative and merging shards in any order gives bit-identical state.

``CollapsingHistogram`` keeps at most ``capacity`` *distinct keys* (the union of the normal and the
anomalous keys: a score seen in both classes is one threshold and uses one unit of capacity). While the
data has at most that many distinct scores it is exact (shift 0: one float64 value per bin). Beyond that
it drops low key bits (``shift``): the smallest shift at which the union fits, found in one pass over
the keys. Because the number of distinct keys of a subset never exceeds that of the whole data, the
final shift is the smallest one at which *all* data fits, whatever the order of updates and merges: the
state depends only on the multiset of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

OVERLAP_BITS = 32
MAX_REGION_PIXELS = (1 << 30) - 1  # keeps tail_count << OVERLAP_BITS inside int64
MAX_SHIFT = 63  # at shift 63 every key is 0 or 1: two bins always fit
BIT_LENGTH_BINS = 66  # bit lengths 0..64 of adjacent keys' XOR, and one spare
WINDOW_MAX_SLOTS = 1 << 21  # dense window: at most 16 MiB of int64 counts whatever the capacity
_UINT64_MAX = (1 << 64) - 1
NARROW_SORT_MIN_KEYS = 1024  # fewer keys: the narrowing's extra passes are not worth it
TORCH_SORT_MIN_KEYS = 4096  # fewer keys: numpy's sort is as fast as torch's and has no conversions
_SIGNED = {np.dtype(np.uint32): np.int32, np.dtype(np.uint64): np.int64}


def group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts in a sorted array."""
    if sorted_values.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.empty(sorted_values.shape[0], dtype=bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments beginning at ``starts`` (exact for int64)."""
    if starts.shape[0] == 0:
        return np.zeros(0, dtype=values.dtype)
    return np.add.reduceat(values, starts)


def bit_lengths(values: np.ndarray) -> np.ndarray:
    """Number of significant bits of each uint64 (0 for 0), exactly: frexp of a float64 is exact below
    2**53, so the high and the low 32-bit halves are measured separately."""
    values = np.asarray(values, dtype=np.uint64)
    high = values >> np.uint64(32)
    has_high = high > 0
    part = np.where(has_high, high, values).astype(np.float64)  # < 2**32 where used: exact
    return np.frexp(part)[1].astype(np.int64) + 32 * has_high


@dataclass
class BinCounts:
    """Counts per occupied key bin; keys sorted ascending and unique; ``overlap`` only for anomalous."""

    shift: int
    keys: np.ndarray  # uint64
    counts: np.ndarray  # int64, >= 1
    overlap: np.ndarray | None = None  # int64 >= 0, units of 2**-OVERLAP_BITS region

    @classmethod
    def empty(cls, with_overlap: bool, shift: int = 0) -> BinCounts:
        zeros = np.zeros(0, dtype=np.int64)
        return cls(shift, np.zeros(0, dtype=np.uint64), zeros, zeros.copy() if with_overlap else None)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def coarsen(self, shift: int) -> BinCounts:
        """The same counts at a coarser ``shift`` (neighbouring bins summed)."""
        if shift < self.shift:
            raise ValueError(f"cannot refine a histogram from shift {self.shift} to {shift}")
        if shift == self.shift:
            return self
        keys = self.keys >> np.uint64(shift - self.shift)
        starts = group_starts(keys)
        overlap = None if self.overlap is None else segment_sums(self.overlap, starts)
        return BinCounts(shift, keys[starts], segment_sums(self.counts, starts), overlap)


def _combine_sorting(parts: list[BinCounts]) -> BinCounts:
    """Sum of parts at one shift by a stable argsort of their sorted runs (a merge, not a full sort)."""
    if len(parts) == 1:
        return parts[0]
    order = np.argsort(np.concatenate([p.keys for p in parts]), kind="stable")
    keys = np.concatenate([p.keys for p in parts])[order]
    starts = group_starts(keys)
    keys = keys[starts]
    counts = segment_sums(np.concatenate([p.counts for p in parts])[order], starts)
    overlap = None
    if parts[0].overlap is not None:
        overlap = segment_sums(np.concatenate([p.overlap for p in parts])[order], starts)
    return BinCounts(parts[0].shift, keys, counts, overlap)


def _merge_into(big: BinCounts, small: BinCounts) -> BinCounts:
    """``big`` + ``small`` (same shift) by inserting the new keys of ``small`` into ``big``: temporaries
    scale with ``small``, not with the sum (the state's big arrays are copied once)."""
    where = np.searchsorted(big.keys, small.keys)
    found = where < len(big)
    found[found] = big.keys[where[found]] == small.keys[found]
    counts = big.counts.copy()
    counts[where[found]] += small.counts[found]
    new = ~found
    overlap = None
    if big.overlap is not None:
        overlap = big.overlap.copy()
        overlap[where[found]] += small.overlap[found]
        overlap = np.insert(overlap, where[new], small.overlap[new])
    return BinCounts(big.shift, np.insert(big.keys, where[new], small.keys[new]),
                     np.insert(counts, where[new], small.counts[new]), overlap)


def combine(parts: list[BinCounts]) -> BinCounts:
    """Sum several ``BinCounts`` of the same kind (brought to the coarsest shift among them)."""
    shift = max(p.shift for p in parts)
    parts = [p.coarsen(shift) for p in parts if len(p)] or [parts[0].coarsen(shift)]
    if len(parts) == 1:
        return parts[0]
    parts.sort(key=len, reverse=True)  # sums of integers: the order of the parts does not matter
    rest = _combine_sorting(parts[1:])
    if 4 * len(rest) < len(parts[0]):  # binary searches of a few keys beat a merge of all of them
        return _merge_into(parts[0], rest)
    return _combine_sorting([parts[0], rest])


def union_keys(*key_arrays: np.ndarray) -> np.ndarray:
    """Sorted unique union of sorted uint64 key arrays (at the same shift)."""
    keys = np.concatenate(key_arrays)
    keys.sort(kind="stable")  # sorted runs: merged, not fully sorted
    return keys[group_starts(keys)]


def extra_shift_to_fit(keys: np.ndarray, capacity: int) -> int:
    """Smallest d such that ``keys >> d`` (sorted unique ``keys``) has at most ``capacity`` values.

    Adjacent keys a < b stay apart at shift d exactly when their XOR has a bit at position >= d, i.e.
    bit_length(a ^ b) > d, so the count at every d comes from one histogram of bit lengths.
    """
    if len(keys) <= capacity:
        return 0
    lengths = np.zeros(BIT_LENGTH_BINS, dtype=np.int64)
    for start in range(0, len(keys) - 1, 1 << 18):  # in chunks: temporaries stay small
        pairs = slice(start, min(start + (1 << 18), len(keys) - 1))
        lengths += np.bincount(bit_lengths(keys[1:][pairs] ^ keys[:-1][pairs]), minlength=BIT_LENGTH_BINS)
    return shift_from_bit_lengths(lengths, capacity)


def shift_from_bit_lengths(lengths: np.ndarray, capacity: int) -> int:
    """``extra_shift_to_fit`` from the histogram of the adjacent keys' XOR bit lengths (its last step,
    shared with the device fold): the smallest d at which 1 + the pairs still apart fit."""
    apart_at = np.cumsum(lengths[::-1])[::-1]  # apart_at[d + 1]: pairs still apart at shift d
    fits = np.flatnonzero(1 + apart_at[1:] <= capacity)
    return int(fits[0])


@dataclass(frozen=True)
class AlignedBins:
    """Normal and anomalous counts on the union of their keys, ready for the curves."""

    shift: int
    keys: np.ndarray
    negatives: np.ndarray
    positives: np.ndarray
    overlap: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def counts_of_keys(keys: np.ndarray, shift: int) -> BinCounts:
    """Sparse counts of raw keys (uint64, already at ``shift``) by sorting.

    Keys that span at most 32 bits above their minimum, once the trailing zero bits they all share are
    dropped, are sorted as uint32 offsets: float32 scores' keys end in 29 zero bits, and a map's scores
    then span ~25 bits. The narrower sort took 0.65x the time with its extra passes included (RESULTS.md,
    fourteenth pass); the counts are the same."""
    narrowed = _narrow_offsets(keys)
    if narrowed is None:
        sorted_keys = sort_unsigned(keys)
        starts = group_starts(sorted_keys)
        unique = sorted_keys[starts]
    else:
        offsets, low, zeros = narrowed
        offsets = sort_unsigned(offsets)
        starts = group_starts(offsets)
        unique = (offsets[starts].astype(np.uint64) << np.uint64(zeros)) + low
    counts = np.diff(np.append(starts, keys.shape[0])).astype(np.int64)
    return BinCounts(shift, unique, counts)


def sort_unsigned(values: np.ndarray) -> np.ndarray:
    """A sorted copy of a uint32 or uint64 array. From ``TORCH_SORT_MIN_KEYS`` values on it is torch's CPU
    sort: 2.1-2.8x numpy's ``np.sort`` for uint64 and 2.2-3.2x for uint32 at 5 x 10^4 - 3 x 10^6 keys, the
    flips included (RESULTS.md, fifteenth pass). torch sorts signed integers only, so the top bit
    is flipped on the way in and back (it maps unsigned order onto signed order)."""
    if values.shape[0] < TORCH_SORT_MIN_KEYS or values.dtype not in _SIGNED:
        return np.sort(values)
    top = values.dtype.type(1 << (8 * values.dtype.itemsize - 1))
    signed = torch.from_numpy((values ^ top).view(_SIGNED[values.dtype]))
    ordered = torch.sort(signed).values.numpy().view(values.dtype)
    ordered ^= top
    return ordered


def _narrow_offsets(keys: np.ndarray) -> tuple[np.ndarray, np.uint64, int] | None:
    """(uint32 offsets, low, zeros) with keys == (offsets << zeros) + low, where the keys allow it (at
    least ``NARROW_SORT_MIN_KEYS`` of them, spanning at most 32 bits past their shared zero bits)."""
    if keys.shape[0] < NARROW_SORT_MIN_KEYS:
        return None
    low = keys.min()
    offsets = keys - low
    common = int(np.bitwise_or.reduce(offsets))
    zeros = (common & -common).bit_length() - 1 if common else 0
    if common.bit_length() - zeros > 32:
        return None
    offsets >>= np.uint64(zeros)
    return offsets.astype(np.uint32), low, zeros


def _smallest_uint(values: np.ndarray, what: str) -> np.ndarray:
    """Non-negative integers in the smallest unsigned dtype that holds them (lossless)."""
    if values.shape[0] and int(values.min()) < 0:
        raise ValueError(f"histogram state: negative {what}")
    top = int(values.max()) if values.shape[0] else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype)
    return values.astype(np.uint64)


def _pack(values: np.ndarray, what: str) -> dict:
    """Mostly-small non-negative integers: one byte each, the values >= 255 listed apart (lossless)."""
    large_at = np.flatnonzero(values >= 255)
    return {"small": np.minimum(values, 255).astype(np.uint8), "large_at": _smallest_uint(large_at, what),
            "large": _smallest_uint(values[large_at], what)}


def _unpack(packed: dict, what: str) -> np.ndarray:
    small, large_at = np.asarray(packed["small"]), np.asarray(packed["large_at"])
    large = np.asarray(packed["large"])
    if small.dtype != np.uint8 or large_at.dtype.kind != "u" or large.dtype.kind != "u" or \
            large_at.shape != large.shape or (len(large_at) and int(large_at.max()) >= len(small)):
        raise ValueError(f"histogram state: malformed {what}")
    values = small.astype(np.uint64)
    values[large_at.astype(np.int64)] = large
    return values


@dataclass
class CollapsingHistogram:
    """At most ``capacity`` distinct keys; exact while the data has at most that many distinct values.

    For speed, normal counts whose keys fall in a dense *window* of consecutive slots (placed on the bulk
    of the data) are added with ``np.bincount`` instead of being sorted; keys outside it, anomalous
    counts and device-reduced batches stay sparse. A slot is one bin at the current shift, or, while the
    shift is below ``FLOAT32_ZERO_BITS``, one float32 value (their keys end in zero bits, so consecutive
    float32 values get consecutive slots). The window never changes the result: the canonical state
    (``consolidate()``) is the same sparse counts whatever the window's position, granularity or presence.
    """

    capacity: int
    normal: BinCounts = field(default_factory=lambda: BinCounts.empty(False))
    anomalous: BinCounts = field(default_factory=lambda: BinCounts.empty(True))
    pending: list[tuple[BinCounts | None, BinCounts | None]] = field(default_factory=list)
    window_start: int = 0
    window_shift: int = 0
    window_extra: int = 0  # slot j holds the normal count of key (window_start + j) << window_extra
    window: np.ndarray | None = None  # int64 normal counts of the slots, disjoint from ``normal``

    def __post_init__(self) -> None:
        if self.capacity < 2:
            raise ValueError(f"histogram capacity must be >= 2, got {self.capacity}")

    @property
    def shift(self) -> int:
        """Current resolution: bins are ``2**shift`` consecutive float64 values wide."""
        parts = [p for pair in self.pending for p in pair if p is not None]
        return max([self.normal.shift, self.anomalous.shift, *(p.shift for p in parts)])

    def add(self, normal: BinCounts | None, anomalous: BinCounts | None) -> None:
        """Add reduced batches (at the current shift or coarser: a device fold may have collapsed them);
        queued and folded in once the queue is large."""
        if normal is not None and self.window is not None:
            if normal.shift > self.window_shift:
                self._close_window()  # the window's slots are finer than these bins
            else:
                normal = self._absorb_into_window(normal)
        self.pending.append((normal, anomalous))
        self._fold_if_large()

    def add_normal_keys(self, keys: np.ndarray, shift: int, zero_bits: int = 0, fold: bool = True) -> None:
        """Add raw normal keys (uint64 at ``shift``, overwritten): bincount in the window, sort the rest.

        ``zero_bits``: low bits known to be clear in the unshifted keys (``FLOAT32_ZERO_BITS`` when the
        scores were float32 or narrower); it only decides the window's granularity, never the result.
        ``fold=False`` leaves folding (and a possible collapse) to the caller's next ``add``, so that it
        can free the batch first.
        """
        if shift < self.shift:  # the histogram collapsed since the caller read its shift
            keys, shift = keys >> np.uint64(self.shift - shift), self.shift
        if keys.shape[0] == 0:
            return
        if self.window is None:
            self._open_window(keys, shift, zero_bits)
        self._count_in_window(keys, shift, zero_bits)
        if fold:
            self._fold_if_large()

    def _count_in_window(self, keys: np.ndarray, shift: int, zero_bits: int) -> None:
        size, extra = len(self.window), self.window_extra
        aligned = None  # None: every key is one slot (its low ``extra`` bits are known to be clear)
        if extra and zero_bits - shift < extra:
            aligned = (keys & np.uint64((1 << extra) - 1)) == 0
        original = keys if aligned is not None else None  # unaligned keys go to the sparse counts as they are
        offset = keys if aligned is None else keys.copy()
        if extra:
            offset >>= np.uint64(extra)
        offset -= np.uint64(self.window_start)  # below the window wraps high
        if aligned is None and int(offset.max()) < size:
            self.window += np.bincount(offset.view(np.int64), minlength=size)
        else:
            inside = offset < np.uint64(size)
            if aligned is not None:
                inside &= aligned
            self.window += np.bincount(offset[inside].view(np.int64), minlength=size)
            outside = ~inside
            if original is not None:
                outside = original[outside]
            else:
                outside = (offset[outside] + np.uint64(self.window_start)) << np.uint64(extra)
            self.pending.append((counts_of_keys(outside, shift), None))

    def _open_window(self, keys: np.ndarray, shift: int, zero_bits: int) -> None:
        extra = max(0, min(zero_bits, 63) - shift)
        slot_space = 1 << (64 - shift - extra)
        size = min(WINDOW_MAX_SLOTS, 2 * self.capacity, slot_space, max(1 << 16, 2 * len(keys)))
        sample = np.sort(keys[:: max(1, len(keys) // 4096)] >> np.uint64(extra))
        centre = int(sample[len(sample) // 2]) if len(sample) else 0
        self.window_start = min(max(0, centre - size // 2), slot_space - size)
        self.window_shift, self.window_extra = shift, extra
        self.window = np.zeros(size, dtype=np.int64)
        self._fold_pending()  # queued normal counts may fall in the window: keep window and sparse disjoint
        self.normal = self._absorb_into_window(self.normal)

    def _window_hits(self, keys: np.ndarray) -> tuple[int, int, np.ndarray]:
        """For sorted ``keys`` at the window's shift: the index range that may fall in the window, and
        which of those keys are one slot each (their slot is ``(key >> extra) - window_start``)."""
        extra = self.window_extra
        lo = int(np.searchsorted(keys, np.uint64(self.window_start << extra)))
        end = (self.window_start + len(self.window)) << extra
        hi = len(keys) if end > _UINT64_MAX else int(np.searchsorted(keys, np.uint64(end)))
        inside = keys[lo:hi]
        aligned = np.ones(len(inside), dtype=bool) if not extra else \
            (inside & np.uint64((1 << extra) - 1)) == 0
        return lo, hi, aligned

    def _slots(self, keys: np.ndarray) -> np.ndarray:
        """Window slots of keys known to be in the window and aligned (uint64 arithmetic: no overflow)."""
        return ((keys >> np.uint64(self.window_extra)) - np.uint64(self.window_start)).astype(np.int64)

    def _absorb_into_window(self, bins: BinCounts) -> BinCounts:
        """Move the counts of ``bins`` that fall in the window into it; return the rest."""
        bins = bins.coarsen(self.window_shift)  # raises if the window is stale (it is closed on collapse)
        lo, hi, aligned = self._window_hits(bins.keys)
        if aligned.any():
            taken = np.flatnonzero(aligned) + lo
            self.window[self._slots(bins.keys[taken])] += bins.counts[taken]
            keep = np.ones(len(bins), dtype=bool)
            keep[taken] = False
            bins = BinCounts(bins.shift, bins.keys[keep], bins.counts[keep])
        return bins

    def _close_window(self) -> None:
        if self.window is not None:
            occupied = np.flatnonzero(self.window)
            keys = (occupied.astype(np.uint64) + np.uint64(self.window_start)) << np.uint64(self.window_extra)
            self.normal = combine([self.normal, BinCounts(self.window_shift, keys, self.window[occupied])])
            self.window = None

    def _fold_pending(self) -> None:
        if self.pending:
            self.normal = combine([self.normal, *(n for n, _ in self.pending if n is not None)])
            self.anomalous = combine([self.anomalous, *(a for _, a in self.pending if a is not None)])
            self.pending = []

    def _folded_union_size(self, window_bins: int) -> int:
        """Distinct keys among the window, ``normal`` and ``anomalous`` (queued batches not counted)."""
        shift = max(self.normal.shift, self.anomalous.shift)
        normal, anomalous = self.normal.coarsen(shift), self.anomalous.coarsen(shift)
        shared = 0
        if len(normal) and len(anomalous):
            where = np.minimum(np.searchsorted(normal.keys, anomalous.keys), len(normal) - 1)
            shared += int(np.count_nonzero(normal.keys[where] == anomalous.keys))
        if self.window is not None and window_bins and len(anomalous) and shift == self.window_shift:
            lo, hi, aligned = self._window_hits(anomalous.keys)
            shared += int(np.count_nonzero(self.window[self._slots(anomalous.keys[lo:hi][aligned])]))
        return window_bins + len(normal) + len(anomalous) - shared

    def _fold_if_large(self) -> None:
        if sum(len(p) for pair in self.pending for p in pair if p is not None) >= self.capacity:
            self._fold_pending()
        window_bins = 0 if self.window is None else int(np.count_nonzero(self.window))
        if window_bins + len(self.normal) + len(self.anomalous) <= self.capacity:
            return  # cheap bound: even without shared keys it fits
        if self._folded_union_size(window_bins) > self.capacity:
            self.consolidate()  # the data no longer fits at this shift: collapse

    def consolidate(self) -> CollapsingHistogram:
        """Canonical state: everything folded into sparse counts, collapsed to the capacity."""
        self._close_window()
        self._fold_pending()
        shift = max(self.normal.shift, self.anomalous.shift)
        normal, anomalous = self.normal.coarsen(shift), self.anomalous.coarsen(shift)
        if len(normal) + len(anomalous) > self.capacity:
            shift = min(MAX_SHIFT, shift + extra_shift_to_fit(union_keys(normal.keys, anomalous.keys),
                                                              self.capacity))
        self.normal, self.anomalous = normal.coarsen(shift), anomalous.coarsen(shift)
        return self

    def merged(self, other: CollapsingHistogram) -> CollapsingHistogram:
        if other.capacity != self.capacity:
            raise ValueError(f"cannot merge histograms of capacity {self.capacity} and {other.capacity}")
        self.consolidate()
        other.consolidate()
        out = CollapsingHistogram(self.capacity, self.normal, self.anomalous,
                                  pending=[(other.normal, other.anomalous)])
        return out.consolidate()

    def aligned(self) -> AlignedBins:
        """Both classes on the union of their keys (for computing curves). The few anomalous keys are
        placed among the many normal ones by binary search: each key's union position is its index plus
        the other class's keys below it (no sort, no search of the normal keys)."""
        self.consolidate()
        normal, anomalous = self.normal, self.anomalous
        where = np.searchsorted(normal.keys, anomalous.keys)  # normal keys below each anomalous key
        shared = where < len(normal)
        shared[shared] = normal.keys[where[shared]] == anomalous.keys[shared]
        new = ~shared
        new_before = np.cumsum(new) - new  # anomalous-only keys below each anomalous key
        anomalous_at = where + new_before
        # a normal key's position: its index plus the anomalous-only keys below it (their `where` <= index)
        below = np.cumsum(np.bincount(where[new], minlength=len(normal) + 1))[:-1]
        normal_at = np.arange(len(normal)) + below
        size = len(normal) + int(new.sum())
        keys = np.empty(size, dtype=np.uint64)
        keys[normal_at] = normal.keys
        keys[anomalous_at] = anomalous.keys
        negatives = np.zeros(size, dtype=np.int64)
        positives, overlap = negatives.copy(), negatives.copy()
        negatives[normal_at] = normal.counts
        positives[anomalous_at] = anomalous.counts
        overlap[anomalous_at] = anomalous.overlap
        return AlignedBins(normal.shift, keys, negatives, positives, overlap)

    # -- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Compact canonical state: the union of keys as steps from the first (after dropping the trailing
        zero bits they all share) and, per union key, the normal and anomalous counts (0 where absent),
        each one byte a key with the values >= 255 listed apart; then the overlap of the keys with
        anomalous counts, in the smallest unsigned dtype that holds it. About 3 bytes per distinct
        score plus 4-8 per anomalous one."""
        bins = self.aligned()
        keys = bins.keys
        steps = np.diff(keys)
        combined = int(np.bitwise_or.reduce(steps)) if len(steps) else 0
        zero_bits = (combined & -combined).bit_length() - 1 if combined else 0
        return {
            "capacity": int(self.capacity),
            "shift": int(bins.shift),
            "first_key": int(keys[0]) if len(keys) else 0,
            "key_zero_bits": int(zero_bits),
            "key_steps": _pack(steps >> np.uint64(zero_bits), "key steps"),
            "normal_counts": _pack(bins.negatives, "counts"),
            "anomalous_counts": _pack(bins.positives, "counts"),
            "anomalous_overlap": _smallest_uint(self.anomalous.overlap, "overlap"),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> CollapsingHistogram:
        """From ``state_dict()``'s format, or from the version-1 format (float32 keys) when exact."""
        if "normal_keys" in state:
            return cls._from_float32_state(state)
        shift, capacity = int(state["shift"]), int(state["capacity"])
        steps = _unpack(state["key_steps"], "key steps")
        normal_counts = _unpack(state["normal_counts"], "counts").astype(np.int64)
        anomalous_counts = _unpack(state["anomalous_counts"], "counts").astype(np.int64)
        overlap = np.asarray(state["anomalous_overlap"])
        if overlap.dtype.kind != "u" or (len(overlap) and int(overlap.max()) > np.iinfo(np.int64).max):
            raise ValueError("histogram state: malformed overlap")
        overlap = overlap.astype(np.int64)
        size = len(normal_counts)
        if len(anomalous_counts) != size or len(steps) != max(0, size - 1):
            raise ValueError("histogram state: key and count arrays have different lengths")
        if len(steps) and int(steps.min()) == 0:
            raise ValueError("histogram state: keys are not sorted and unique")
        if bool(np.any(normal_counts + anomalous_counts == 0)):
            raise ValueError("histogram state: every key needs a positive count")
        has_anomalous = anomalous_counts > 0
        if len(overlap) != int(has_anomalous.sum()):
            raise ValueError("histogram state: one overlap per anomalous key expected")
        keys = np.zeros(size, dtype=np.uint64)
        if size:
            keys[0] = np.uint64(int(state["first_key"]))
            keys[1:] = steps.astype(np.uint64) << np.uint64(int(state["key_zero_bits"]))
            keys = np.cumsum(keys, dtype=np.uint64)
        has_normal = normal_counts > 0
        normal = BinCounts(shift, keys[has_normal], normal_counts[has_normal])
        anomalous = BinCounts(shift, keys[has_anomalous], anomalous_counts[has_anomalous], overlap)
        return cls(capacity, normal, anomalous)

    @classmethod
    def _from_float32_state(cls, state: dict) -> CollapsingHistogram:
        """Version-1 state (order-preserving float32 -> uint32 keys): exact at shift 0; a collapsed one
        converts when every float32 bin lies inside one float64 bin (2**29 times wider), else raises."""
        from residual_core.metrics.encoding import FLOAT32_ZERO_BITS, decode_float32_keys, encode_numpy

        old_shift = int(state["shift"])
        new_shift = old_shift + FLOAT32_ZERO_BITS if old_shift else 0
        parts = []
        for kind, with_overlap in (("normal", False), ("anomalous", True)):
            keys32 = np.asarray(state[f"{kind}_keys"], dtype=np.uint32).astype(np.int64)
            counts = np.asarray(state[f"{kind}_counts"], dtype=np.int64)
            overlap = np.asarray(state[f"{kind}_overlap"], dtype=np.int64) if with_overlap else None
            if counts.shape != keys32.shape or (overlap is not None and overlap.shape != keys32.shape):
                raise ValueError(f"histogram state: {kind} arrays have different lengths")
            if len(keys32) > 1 and not bool(np.all(keys32[1:] > keys32[:-1])):
                raise ValueError(f"histogram state: {kind} keys are not sorted and unique")
            low = np.clip(keys32 << old_shift, 0x007FFFFF, 0xFF800000)  # numbers only (no NaN patterns)
            high = np.clip(((keys32 + 1) << old_shift) - 1, 0x007FFFFF, 0xFF800000)
            keys = encode_numpy(decode_float32_keys(low)) >> np.uint64(new_shift)
            high_keys = encode_numpy(decode_float32_keys(high)) >> np.uint64(new_shift)
            if old_shift and not np.array_equal(keys, high_keys):
                raise ValueError(f"a version-1 metric state collapsed at float32 shift {old_shift} has bins "
                                 "that straddle float64 bins (negative, zero or subnormal scores); it cannot "
                                 "be converted exactly: recompute it with this version")
            parts.append(BinCounts(new_shift, keys, counts, overlap))
        return cls(int(state["capacity"]), *parts)
