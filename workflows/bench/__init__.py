"""`build-bench`: an offline benchmark of synthetic defects on real photos, plus ELPV solar cells."""

from workflows.bench.builder import BenchSummary, build_bench
from workflows.bench.config import SCALES, BenchConfig, BenchScale

__all__ = ["SCALES", "BenchConfig", "BenchScale", "BenchSummary", "build_bench"]
