"""Run config: YAML + `--set` overrides, types checked, unknown keys named."""

from __future__ import annotations

import re

import pytest

from workflows.config import ConfigError, RunConfig, load_config, parse_override


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {url: s3://bucket/bench}\nevaluate: {batch_size: 4}\n"
                    "lodo: {methods: [{name: baseline}, {name: resadpp, params: {epochs: 2}}]}\n")
    config = load_config(str(path), ["evaluate.num_actors=2", "index.shots=4", "backbone.layers=[1,2]"])
    assert config.data.url == "s3://bucket/bench" and config.data.datasets == []
    assert (config.evaluate.batch_size, config.evaluate.num_actors) == (4, 2)
    assert config.index.shots == [4] and config.backbone.layers == [1, 2]
    assert [m.name for m in config.lodo.methods] == ["baseline", "resadpp"]
    assert config.lodo.methods[1].params == {"epochs": 2}
    assert config.key() == load_config(str(path), ["evaluate.num_actors=2", "index.shots=[4]",
                                                   "backbone.layers=[1,2]"]).key()
    assert RunConfig().key("backbone") != config.key("backbone")


@pytest.mark.parametrize("override, message", [
    ("evaluate.batchsize=4", "unknown key(s) ['batchsize']"),
    ("evaluate.batch_size=many", "config.evaluate.batch_size: expected int"),
    ("nonsense", "expected key.sub=value"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override])


def test_override_values_are_yaml():
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("method.checkpoint=null") == ("method.checkpoint", None)


def test_local_paths_become_absolute_so_every_ray_worker_sees_the_same_place(tmp_path, monkeypatch):
    from workflows.config import load_config

    monkeypatch.chdir(tmp_path)
    config = load_config(None, ["data.url=bench", "output=runs", "method.checkpoint=ckpt",
                                "lodo.methods=[{name: resadpp, checkpoint: other}]"])
    assert config.data.url == str(tmp_path / "bench")
    assert config.output == str(tmp_path / "runs")
    assert config.method.checkpoint == str(tmp_path / "ckpt")
    assert config.lodo.methods[0].checkpoint == str(tmp_path / "other")
    s3 = load_config(None, ["data.url=s3://bucket/bench", "output=file:///abs/runs"])
    assert s3.data.url == "s3://bucket/bench" and s3.output == "/abs/runs"
