"""Exact, streaming, mergeable anomaly-detection metrics (see docs/metrics.md)."""

from residual_core.metrics.accumulator import IMAGE_METRICS, MetricAccumulator, pixel_metric_names
from residual_core.metrics.groups import GroupedAccumulator
from residual_core.metrics.summary import summarize_dataset, summarize_runs

__all__ = ["IMAGE_METRICS", "GroupedAccumulator", "MetricAccumulator", "pixel_metric_names",
           "summarize_dataset", "summarize_runs"]
