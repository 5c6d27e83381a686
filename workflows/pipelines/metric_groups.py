"""Which metric group an evaluated image belongs to, and a category's metrics from its groups.

Scoring keeps one accumulator per group (`residual_core.metrics.GroupedAccumulator`): the category's
normal images are one group, the anomalous images of each defect type one group each (an anomaly
without a defect type counts as `UNTYPED_DEFECT`). At finalisation the category's metrics are the
merge of all its groups (the same as one accumulator fed every image) and a defect type's metrics are
the merge of the normals and that type: its images against the category's normals.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # residual_core.metrics imports torch: only where metrics are computed
    from residual_core.metrics import GroupedAccumulator, MetricAccumulator

NORMAL_GROUP = "normal"
DEFECT_PREFIX = "defect:"  # anomalous groups; keeps a defect type called "normal" apart from the normals
UNTYPED_DEFECT = "anomalous"  # the defect type of an anomaly without one (flat folder layout, VisA)
NO_PIXEL_TRUTH = "no pixel ground truth: the dataset manifest declares none for this category"


def group_of(label: int, defect_type: str | None) -> str:
    """The metric group of a labelled image."""
    return NORMAL_GROUP if label == 0 else DEFECT_PREFIX + (defect_type or UNTYPED_DEFECT)


def defect_types(grouped: GroupedAccumulator) -> list[str]:
    """The defect types present among the groups, sorted."""
    return sorted(name[len(DEFECT_PREFIX):] for name in grouped.groups if name.startswith(DEFECT_PREFIX))


def category_accumulator(state: dict) -> MetricAccumulator:
    """A shard's committed metric state as one accumulator (grouped states merged; a plain state, as
    jobs of evaluation protocol 2 wrote it, as it is)."""
    from residual_core.metrics import GroupedAccumulator, MetricAccumulator

    if GroupedAccumulator.is_grouped_state(state):
        return GroupedAccumulator.from_state_dict(state).merged()
    return MetricAccumulator.from_state_dict(state)


def category_metrics(grouped: GroupedAccumulator, pixel_gt: bool) -> tuple[dict, dict[str, dict]]:
    """(the category's metrics, defect type -> metrics of its images against the normals), JSON-clean;
    pixel metrics undefined, with the reason, where the category has no pixel ground truth."""
    def finish(accumulator: MetricAccumulator) -> dict:
        metrics = clean_metrics(accumulator.compute())
        return metrics if pixel_gt else without_pixel_truth(metrics)

    per_type = {defect: finish(grouped.merged([NORMAL_GROUP, DEFECT_PREFIX + defect]))
                for defect in defect_types(grouped)}
    return finish(grouped.merged()), per_type


def without_pixel_truth(metrics: dict) -> dict:
    """Pixel metrics of a category without pixel ground truth: undefined, and the reason says why."""
    from residual_core.metrics import pixel_metric_names

    names = pixel_metric_names(0.3)
    reasons = {**metrics.get("not_defined", {}), **dict.fromkeys(names, NO_PIXEL_TRUTH)}
    return {**metrics, **dict.fromkeys(names), "not_defined": reasons}


def clean_metrics(computed: dict) -> dict:
    """compute() output made JSON-safe (floats or None; NaN -> None)."""
    out = {}
    for key, value in computed.items():
        if hasattr(value, "item"):
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[key] = value
    return out
