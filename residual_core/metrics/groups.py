"""``GroupedAccumulator``: one ``MetricAccumulator`` per group of images (e.g. the normals, each defect type).

Each image of a batch goes to exactly one group, so every pixel is reduced once, as with a single
accumulator. Accumulator states depend only on the multiset of samples (``accumulator.py``), so the
merge of all groups equals one accumulator fed everything, and the merge of a few groups (the normals
and one defect type) gives that subset's metrics without scoring anything twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from residual_core.metrics.accumulator import MetricAccumulator

GROUPED_STATE_VERSION = 1


def _take(values, rows: slice | np.ndarray):
    """Rows of a batch (numpy array or tensor, on its device): a slice is a view, an index array a
    copy; None stays None."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor) and not isinstance(rows, slice):
        return values[torch.from_numpy(rows).to(values.device)]
    return values[rows] if isinstance(values, torch.Tensor) else np.asarray(values)[rows]


def _partition(names: np.ndarray) -> list[tuple[str, slice | np.ndarray]]:
    """(group, rows) per group of a batch: slices (views, no copy) when each group's rows are one
    run, as when the caller ordered the batch by group; else index arrays."""
    unique, inverse = np.unique(names.astype(str), return_inverse=True)
    starts = np.flatnonzero(np.diff(inverse)) + 1
    if len(starts) == len(unique) - 1:
        bounds = [0, *starts.tolist(), len(names)]
        return [(str(unique[inverse[a]]), slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    return [(str(name), np.flatnonzero(inverse == position)) for position, name in enumerate(unique)]


class GroupedAccumulator:
    """Metric accumulators by group name; ``update`` partitions each batch by its rows' groups."""

    def __init__(self, **config) -> None:
        self.config = dict(config)  # MetricAccumulator keyword arguments, the same for every group
        self.groups: dict[str, MetricAccumulator] = {}

    def group(self, name: str) -> MetricAccumulator:
        if name not in self.groups:
            self.groups[name] = MetricAccumulator(**self.config)
        return self.groups[name]

    def update(self, groups: Sequence[str], image_scores, labels, anomaly_maps=None, masks=None,
               has_mask=None) -> None:
        """``MetricAccumulator.update`` of a batch whose row ``i`` belongs to group ``groups[i]`` (rows
        ordered by group avoid any copy)."""
        names = np.asarray(list(groups), dtype=object)
        batch = len(image_scores)
        if names.shape[0] != batch:
            raise ValueError(f"groups has {names.shape[0]} entries for {batch} image scores")
        if batch == 0:
            return
        for name, rows in _partition(names):
            self.group(name).update(_take(image_scores, rows), _take(labels, rows), _take(anomaly_maps, rows),
                                    _take(masks, rows), _take(has_mask, rows))

    def merged(self, names: Iterable[str] | None = None) -> MetricAccumulator:
        """One accumulator holding the named groups (all when None; missing names hold nothing)."""
        chosen = sorted(self.groups if names is None else set(names) & set(self.groups))
        total = MetricAccumulator(**self.config)
        for name in chosen:
            total = total.merge(self.groups[name])
        return total

    def merge(self, other: GroupedAccumulator) -> GroupedAccumulator:
        """Group-wise merge (a group present on one side only is kept as it is)."""
        if other.config != self.config:
            raise ValueError(f"cannot merge grouped accumulators: configs {self.config} and {other.config}")
        out = GroupedAccumulator(**self.config)
        for name in sorted(set(self.groups) | set(other.groups)):
            left, right = self.groups.get(name), other.groups.get(name)
            out.groups[name] = left.merge(right) if left is not None and right is not None else left or right
        return out

    def state_dict(self) -> dict:
        """Plain python/numpy state: each group's ``MetricAccumulator.state_dict()``."""
        return {"grouped_version": GROUPED_STATE_VERSION, "config": dict(self.config),
                "groups": {name: acc.state_dict() for name, acc in sorted(self.groups.items())}}

    @staticmethod
    def is_grouped_state(state: dict) -> bool:
        return "grouped_version" in state

    @classmethod
    def from_state_dict(cls, state: dict) -> GroupedAccumulator:
        if state.get("grouped_version") != GROUPED_STATE_VERSION:
            raise ValueError(f"unsupported grouped metric state version {state.get('grouped_version')!r}; "
                             f"expected {GROUPED_STATE_VERSION}")
        out = cls(**state["config"])
        out.groups = {name: MetricAccumulator.from_state_dict(s) for name, s in state["groups"].items()}
        return out
