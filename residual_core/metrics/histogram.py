"""Bounded, mergeable score histograms over order-preserving keys.

``BinCounts`` holds, per occupied bin (sorted unique ``keys`` at a given ``shift``), a sample count and,
for anomalous pixels, the per-region overlap numerator used by AUPRO (integer units of
``2**-OVERLAP_BITS`` of a region). Normal and anomalous samples are kept apart because anomalous ones
are few: the large normal part carries one value array only. Everything is an integer, so adding counts
is associative and merging shards in any order gives bit-identical state.

``CollapsingHistogram`` keeps at most ``capacity`` bins (normal + anomalous). While the data has at most
that many distinct float32 values it is exact (shift 0). Beyond that it drops one low key bit at a time
(``shift += 1``), which halves the relative resolution. Because the number of distinct keys of a subset
never exceeds that of the whole data, the final shift is the smallest one at which *all* data fits,
whatever the order of updates and merges: the state depends only on the multiset of samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

OVERLAP_BITS = 32
MAX_REGION_PIXELS = (1 << 30) - 1  # keeps tail_count << OVERLAP_BITS inside int64


def group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values starts in a sorted array."""
    if sorted_values.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.empty(sorted_values.shape[0], dtype=bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def segment_sums(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums of consecutive segments beginning at ``starts`` (exact for int64; faster than reduceat)."""
    if starts.shape[0] == 0:
        return np.zeros(0, dtype=values.dtype)
    running = np.cumsum(values)
    ends = np.append(starts[1:], values.shape[0]) - 1
    totals = running[ends]
    return np.diff(totals, prepend=values.dtype.type(0))


@dataclass
class BinCounts:
    """Counts per occupied key bin; keys sorted ascending and unique; ``overlap`` only for anomalous."""

    shift: int
    keys: np.ndarray  # uint32
    counts: np.ndarray  # int64
    overlap: np.ndarray | None = None  # int64, units of 2**-OVERLAP_BITS region

    @classmethod
    def empty(cls, with_overlap: bool, shift: int = 0) -> BinCounts:
        zeros = np.zeros(0, dtype=np.int64)
        return cls(shift, np.zeros(0, dtype=np.uint32), zeros, zeros.copy() if with_overlap else None)

    def __len__(self) -> int:
        return int(self.keys.shape[0])

    def coarsen(self, shift: int) -> BinCounts:
        """The same counts at a coarser ``shift`` (neighbouring bins summed)."""
        if shift < self.shift:
            raise ValueError(f"cannot refine a histogram from shift {self.shift} to {shift}")
        if shift == self.shift:
            return self
        keys = self.keys >> np.uint32(shift - self.shift)
        starts = group_starts(keys)
        overlap = None if self.overlap is None else segment_sums(self.overlap, starts)
        return BinCounts(shift, keys[starts], segment_sums(self.counts, starts), overlap)


def combine(parts: list[BinCounts]) -> BinCounts:
    """Sum several ``BinCounts`` of the same kind (brought to the coarsest shift among them)."""
    shift = max(p.shift for p in parts)
    parts = [p.coarsen(shift) for p in parts if len(p)] or [parts[0].coarsen(shift)]
    if len(parts) == 1:
        return parts[0]
    keys = np.concatenate([p.keys for p in parts])
    order = np.argsort(keys, kind="stable")  # the parts are sorted runs: a merge, not a full sort
    keys = keys[order]
    starts = group_starts(keys)
    counts = segment_sums(np.concatenate([p.counts for p in parts])[order], starts)
    overlap = None
    if parts[0].overlap is not None:
        overlap = segment_sums(np.concatenate([p.overlap for p in parts])[order], starts)
    return BinCounts(shift, keys[starts], counts, overlap)


def _distinct(bins: BinCounts, shift: int) -> int:
    """Number of bins ``bins`` would have at ``shift`` (>= its own)."""
    if len(bins) < 2 or shift == bins.shift:
        return len(bins)
    keys = bins.keys >> np.uint32(shift - bins.shift)
    return 1 + int(np.count_nonzero(keys[1:] != keys[:-1]))


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
    """Sparse counts of raw keys (uint32, already at ``shift``) by sorting."""
    sorted_keys = np.sort(keys)
    starts = group_starts(sorted_keys)
    counts = np.diff(np.append(starts, sorted_keys.shape[0])).astype(np.int64)
    return BinCounts(shift, sorted_keys[starts], counts)


@dataclass
class CollapsingHistogram:
    """At most ``capacity`` bins; exact while the data has at most that many distinct values.

    For speed, normal counts whose keys fall in a dense *window* of ``2 * capacity`` bins (placed on the
    bulk of the data) are added with ``np.bincount`` instead of being sorted; keys outside it, anomalous
    counts and device-reduced batches stay sparse. The window never changes the result: the canonical
    state (``consolidate()``) is the same sparse counts whatever the window's position or presence.
    """

    capacity: int
    normal: BinCounts = field(default_factory=lambda: BinCounts.empty(False))
    anomalous: BinCounts = field(default_factory=lambda: BinCounts.empty(True))
    pending: list[tuple[BinCounts | None, BinCounts | None]] = field(default_factory=list)
    window_start: int = 0
    window_shift: int = 0
    window: np.ndarray | None = None  # int64 normal counts of keys window_start + i, disjoint from normal

    def __post_init__(self) -> None:
        if self.capacity < 2:
            raise ValueError(f"histogram capacity must be >= 2, got {self.capacity}")

    @property
    def shift(self) -> int:
        """Current resolution: bins are ``2**shift`` consecutive float32 values wide."""
        parts = [p for pair in self.pending for p in pair if p is not None]
        return max([self.normal.shift, self.anomalous.shift, *(p.shift for p in parts)])

    def add(self, normal: BinCounts | None, anomalous: BinCounts | None) -> None:
        """Add reduced batches (at the current shift); queued and folded in once the queue is large."""
        if normal is not None and self.window is not None:
            normal = self._absorb_into_window(normal)
        self.pending.append((normal, anomalous))
        self._fold_if_large()

    def add_normal_keys(self, keys: np.ndarray, shift: int) -> None:
        """Add raw normal keys (uint32 at ``shift``, overwritten): bincount in the window, sort the rest."""
        if shift < self.shift:  # the histogram collapsed since the caller read its shift
            keys, shift = keys >> np.uint32(self.shift - shift), self.shift
        if keys.shape[0] == 0:
            return
        if self.window is None:
            self._open_window(keys, shift)
        size = len(self.window)
        offset = np.subtract(keys, np.uint32(self.window_start), out=keys)  # below the window wraps high
        if int(offset.max()) < size:
            self.window += np.bincount(offset, minlength=size)
        else:
            inside = offset < np.uint32(size)
            self.window += np.bincount(offset[inside], minlength=size)
            outside = offset[~inside] + np.uint32(self.window_start)
            self.pending.append((counts_of_keys(outside, shift), None))
        self._fold_if_large()

    def _open_window(self, keys: np.ndarray, shift: int) -> None:
        key_space = 1 << (32 - shift)
        size = min(2 * self.capacity, key_space, max(1 << 16, 2 * len(keys)))  # small batches: small window
        sample = keys[:: max(1, len(keys) // 4096)]
        centre = int(np.median(sample)) if len(sample) else 0
        self.window_start = min(max(0, centre - size // 2), key_space - size)
        self.window_shift = shift
        self.window = np.zeros(size, dtype=np.int64)
        self._fold_pending()  # queued normal counts may fall in the window: keep window and sparse disjoint
        self.normal = self._absorb_into_window(self.normal)

    def _absorb_into_window(self, bins: BinCounts) -> BinCounts:
        """Move the counts of ``bins`` that fall in the window into it; return the rest."""
        bins = bins.coarsen(self.window_shift)  # raises if the window is stale (it is closed on collapse)
        lo = np.searchsorted(bins.keys, np.uint32(self.window_start))
        hi = np.searchsorted(bins.keys, np.uint32(self.window_start + len(self.window) - 1), side="right")
        if hi > lo:
            self.window[bins.keys[lo:hi].astype(np.int64) - self.window_start] += bins.counts[lo:hi]
            keep = np.r_[0:lo, hi:len(bins)]
            bins = BinCounts(bins.shift, bins.keys[keep], bins.counts[keep])
        return bins

    def _close_window(self) -> None:
        if self.window is not None:
            occupied = np.flatnonzero(self.window)
            keys = (occupied + self.window_start).astype(np.uint32)
            self.normal = combine([self.normal, BinCounts(self.window_shift, keys, self.window[occupied])])
            self.window = None

    def _fold_pending(self) -> None:
        if self.pending:
            self.normal = combine([self.normal, *(n for n, _ in self.pending if n is not None)])
            self.anomalous = combine([self.anomalous, *(a for _, a in self.pending if a is not None)])
            self.pending = []

    def _fold_if_large(self) -> None:
        if sum(len(p) for pair in self.pending for p in pair if p is not None) >= self.capacity:
            self._fold_pending()
        window_bins = 0 if self.window is None else int(np.count_nonzero(self.window))
        if window_bins + len(self.normal) + len(self.anomalous) > self.capacity:
            self.consolidate()  # the data no longer fits at this shift: collapse

    def consolidate(self) -> CollapsingHistogram:
        """Canonical state: everything folded into sparse counts, collapsed to the capacity."""
        self._close_window()
        self._fold_pending()
        shift = max(self.normal.shift, self.anomalous.shift)
        while _distinct(self.normal, shift) + _distinct(self.anomalous, shift) > self.capacity:
            shift += 1
        self.normal, self.anomalous = self.normal.coarsen(shift), self.anomalous.coarsen(shift)
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
        """Both classes on the union of their keys (for computing curves)."""
        self.consolidate()
        keys = np.sort(np.concatenate([self.normal.keys, self.anomalous.keys]))
        keys = keys[group_starts(keys)]
        negatives = np.zeros(len(keys), dtype=np.int64)
        positives, overlap = negatives.copy(), negatives.copy()
        negatives[np.searchsorted(keys, self.normal.keys)] = self.normal.counts
        where = np.searchsorted(keys, self.anomalous.keys)
        positives[where] = self.anomalous.counts
        overlap[where] = self.anomalous.overlap
        return AlignedBins(self.normal.shift, keys, negatives, positives, overlap)

    def state_dict(self) -> dict:
        self.consolidate()
        return {
            "capacity": int(self.capacity),
            "shift": int(self.normal.shift),
            "normal_keys": self.normal.keys.copy(),
            "normal_counts": self.normal.counts.copy(),
            "anomalous_keys": self.anomalous.keys.copy(),
            "anomalous_counts": self.anomalous.counts.copy(),
            "anomalous_overlap": self.anomalous.overlap.copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> CollapsingHistogram:
        shift = int(state["shift"])
        parts = []
        for kind, with_overlap in (("normal", False), ("anomalous", True)):
            keys = np.asarray(state[f"{kind}_keys"], dtype=np.uint32)
            counts = np.asarray(state[f"{kind}_counts"], dtype=np.int64)
            overlap = np.asarray(state[f"{kind}_overlap"], dtype=np.int64) if with_overlap else None
            if counts.shape != keys.shape or (overlap is not None and overlap.shape != keys.shape):
                raise ValueError(f"histogram state: {kind} arrays have different lengths")
            if len(keys) > 1 and not bool(np.all(keys[1:] > keys[:-1])):
                raise ValueError(f"histogram state: {kind} keys are not sorted and unique")
            parts.append(BinCounts(shift, keys, counts, overlap))
        return cls(int(state["capacity"]), *parts)
