"""Small index steps build their banks in the driver process (`index.local_max_images`), larger ones as Ray
tasks; both give the same banks."""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from residual_core.bank import load_bank  # noqa: E402
from tests.workflows.pipelines.tiny_data import EVAL_BASE, write_tiny  # noqa: E402
from workflows.config import load_config  # noqa: E402
from workflows.pipelines import index  # noqa: E402
from workflows.pipelines.artifacts import local_dir  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("tiny") / "data"))


def _banks(config) -> dict:
    plans = index.run_index(config)
    return {(req.dataset, req.category, req.k_shot): load_bank(local_dir(plan.url))
            for req, plan in plans.items()}


def test_banks_built_here_equal_the_ray_tasks_banks(local_ray, tiny_data, tmp_path, monkeypatch):
    base = [*EVAL_BASE, f"data.url={tiny_data}", "index.shots=[1,2]"]
    tasks = []
    real = index._build_as_tasks
    monkeypatch.setattr(index, "_build_as_tasks", lambda *a, **k: tasks.append(len(a[2])) or real(*a, **k))

    here = _banks(load_config(None, [*base, f"output={tmp_path / 'here'}"]))
    assert tasks == []  # 3 categories x (1 + 2) references: within the default limit
    as_tasks = _banks(load_config(None, [*base, f"output={tmp_path / 'tasks'}", "index.local_max_images=8"]))
    assert tasks == [6]
    assert here.keys() == as_tasks.keys() and len(here) == 6
    for name, bank in here.items():
        other = as_tasks[name]
        assert bank.header.image_ids == other.header.image_ids
        assert all(torch.equal(a, b) for a, b in zip(bank.features, other.features, strict=True))
    assert not index._BACKBONES  # the driver keeps no model after building here


def test_the_limit_is_validated():
    from workflows.config import ConfigError

    with pytest.raises(ConfigError, match="index.local_max_images"):
        load_config(None, ["index.local_max_images=-1"])
