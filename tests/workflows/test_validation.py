"""Bad configs and inputs fail on the driver, before Ray starts: one line, exit code 2, in seconds."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.workflows.ingest.trees import build_folder_tree
from tests.workflows.pipelines.tiny_data import write_tiny
from workflows.cli import main
from workflows.config import ConfigError, load_config
from workflows.datasets.schema import MANIFEST_NAME


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny(str(tmp_path_factory.mktemp("validation") / "data"))  # 4 normal train per category


def _run(command, data, output, *overrides, capfd):
    args = [command, "--set", f"data.url={data}", "--set", f"output={output}",
            "--set", "tracking.enabled=false"]
    for item in overrides:
        args += ["--set", item]
    capfd.readouterr()
    started = time.monotonic()
    code = main(args)
    elapsed = time.monotonic() - started
    return code, capfd.readouterr(), elapsed


BAD = [  # (command, overrides, words the one error line must contain)
    ("evaluate", ["method.name=nosuch"], ["unknown method 'nosuch' (method.name)", "baseline"]),
    ("evaluate", ["method.params={bogus: 1}"], ["(method.params)", "unknown config keys ['bogus']"]),
    ("evaluate", ["method.name=resadpp", "method.params={epochs: -1}"],
     ["(method.params)", "epochs must be"]),
    ("evaluate", ["method.params={normalize: maybe}"], ["(method.params)", "normalize must be"]),
    ("evaluate", ["data.url={tmp}/nowhere"], ["(data.url)", "no committed residual-ad dataset", "ingest"]),
    ("evaluate", ["data.datasets=[textures,nosuch]"], ["nosuch (data.datasets)", "labels, photos, textures"]),
    ("evaluate", ["data.categories=[brick,nosuch]"], ["nosuch (data.categories)", "brick"]),
    ("evaluate", ["index.shots=[1,5]"], ["(index.shots=5)", "textures/brick has 4", "lower index.shots"]),
    ("evaluate", ["index.shots=[]"], ["(index.shots)", "must not be empty"]),
    ("evaluate", ["evaluate.shard_size=0"], ["bad value 0 (evaluate.shard_size)", ">= 1"]),
    ("evaluate", ["evaluate.batch_size=0"], ["bad value 0 (evaluate.batch_size)"]),
    ("evaluate", ["evaluate.num_actors=0"], ["bad value 0 (evaluate.num_actors)"]),
    ("evaluate", ["evaluate.actors_per_gpu=0"], ["bad value 0 (evaluate.actors_per_gpu)", ">= 1"]),
    ("evaluate", ["evaluate.save_maps=bogus"], ["(evaluate.save_maps)", "none, sample, all"]),
    ("evaluate", ["evaluate.map_dtype=bogus"], ["(evaluate.map_dtype)", "float16, float32"]),
    ("evaluate", ["evaluate.map_sample_fraction=0"], ["(evaluate.map_sample_fraction)", "(0, 1]"]),
    ("evaluate", ["device=tpu"], ["(device)", "auto, cpu, cuda"]),
    ("evaluate", ["evaluate.batch_size=many"], ["evaluate.batch_size", "expected int"]),
    ("evaluate", ["method.checkpoint={tmp}/no-checkpoint"], ["missing checkpoint (method.checkpoint)"]),
    ("lodo", ["lodo.methods=[{name: nosuch}]"], ["unknown method 'nosuch' (lodo.methods[0].name)"]),
    ("lodo", ["lodo.holdout=[nosuch]"], ["nosuch (lodo.holdout)"]),
    ("train", ["train.datasets=[nosuch]"], ["nosuch (train.datasets)"]),
    ("train", ["train.ref_shot=9"], ["(train.ref_shot=9)"]),
    ("index", ["index.shots=[0]"], ["(index.shots)", ">= 1"]),
    ("index", ["data.categories=[nosuch]"], ["nosuch (data.categories)"]),
]


@pytest.mark.parametrize(("command", "overrides", "words"), BAD,
                         ids=[f"{c}-{'-'.join(o)}" for c, o, _ in BAD])
def test_bad_config_fails_before_ray_with_one_line(tiny, tmp_path, capfd, command, overrides, words):
    import ray

    overrides = [item.replace("{tmp}", str(tmp_path)) for item in overrides]
    code, printed, elapsed = _run(command, tiny, tmp_path / "runs", *overrides, capfd=capfd)
    lines = [line for line in printed.err.splitlines() if line.strip()]
    assert code == 2, printed.err
    assert len(lines) == 1, printed.err
    assert lines[0].startswith(f"residual-ad {command}: error: "), lines[0]
    assert "Traceback" not in printed.err
    for word in words:
        assert word in lines[0], lines[0]
    assert not ray.is_initialized()
    assert elapsed < 10, elapsed
    assert not (tmp_path / "runs").exists()  # nothing was started, nothing written


def test_debug_flag_prints_the_traceback_too(tiny, tmp_path, capfd):
    capfd.readouterr()
    code = main(["evaluate", "--debug", "--set", f"data.url={tiny}", "--set", "evaluate.shard_size=0"])
    printed = capfd.readouterr()
    assert code == 2
    assert "Traceback" in printed.err
    assert printed.err.strip().splitlines()[-1].startswith("residual-ad evaluate: error: bad value 0")


def test_enums_and_ranges_are_rejected_by_load_config():
    for override, key in [("evaluate.save_maps=bogus", "evaluate.save_maps"),
                          ("evaluate.shard_size=0", "evaluate.shard_size"),
                          ("index.seeds=[]", "index.seeds"), ("device=gpu", "device")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [override])
    assert load_config(None, ["device=cuda:1", "evaluate.save_maps=sample"]).evaluate.save_maps == "sample"


def _ingest_cli(src, dest, *extra, capfd):
    capfd.readouterr()
    code = main(["ingest", "--format", "folder", "--no-progress", "--workers", "1", *extra,
                 str(src), str(dest)])
    return code, capfd.readouterr()


def test_ingest_warns_for_a_category_without_train_images_and_strict_fails(tmp_path, capfd):
    src = tmp_path / "parts"
    build_folder_tree(src)
    shutil.rmtree(src / "leather" / "train")
    code, printed = _ingest_cli(src, tmp_path / "out", capfd=capfd)
    assert code == 0, printed.err
    warnings = [line for line in printed.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "parts/leather: no normal train images" in warnings[0], printed.err
    code, printed = _ingest_cli(src, tmp_path / "strict", "--strict", capfd=capfd)
    assert code == 2
    assert "1 categories without normal train images (leather)" in printed.err
    assert not (tmp_path / "strict" / MANIFEST_NAME).exists()


def test_ingest_of_complete_folder_tree_has_no_warning(tmp_path, capfd):
    build_folder_tree(tmp_path / "parts")
    code, printed = _ingest_cli(tmp_path / "parts", tmp_path / "out", capfd=capfd)
    assert code == 0 and "warning:" not in printed.err, printed.err
