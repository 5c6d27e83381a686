"""One small benchmark build shared by the bench tests (building is the slow part)."""

from __future__ import annotations

import pytest

from workflows.bench import BenchConfig, build_bench


@pytest.fixture(scope="session")
def small_bench(tmp_path_factory):
    """(url, summary) of a small-scale build with seed 0 on the local disk."""
    url = str(tmp_path_factory.mktemp("bench") / "seed0")
    return url, build_bench(url, BenchConfig(seed=0, scale="small"))
