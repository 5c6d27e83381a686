"""Scan's overlay PNGs and per-category thresholds without Ray: safe names, rendering, reading and
checking thresholds files and earlier runs, the CLI's one-line errors before Ray starts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from workflows import storage
from workflows.config import ConfigError
from workflows.pipelines.calibration import Calibration, CategoryThreshold, calibrate
from workflows.pipelines.scan import ScanOptions
from workflows.pipelines.scan_outputs import overlay_name
from workflows.pipelines.scan_thresholds import (
    GivenThresholds,
    apply_given,
    check_threshold_options,
    describe_origins,
    read_earlier_run,
    read_thresholds_file,
)
from workflows.reports.overlay import MIN_SIDE_PX, display_image, overlay_limits, overlay_png, overlay_size


def test_overlay_names_are_safe_unique_and_readable():
    assert overlay_name("brick/003/img 7.JPG", "id").startswith("brick__003__img_7-")
    hostile = ["../../etc/passwd", "a/../../b", "/abs/path.png", "..", ".hidden", "x\\..\\y.png",
               "a/b\x00c.png", "é/ü.png", "", "a" * 5000 + ".png"]
    names = [overlay_name(source, "id") for source in hostile]
    for name in names:
        assert "/" not in name and "\\" not in name and not name.startswith(".") and ".." not in name
        assert name.endswith(".png") and len(name) <= 120 and name.count(".") == 1
    assert len(set(names)) == len(names)
    # two paths that clean to the same stem stay apart; the same image always gets the same name
    assert overlay_name("a b/c.png", "1") != overlay_name("a_b/c.png", "1")
    assert overlay_name("brick/x.png", "1") == overlay_name("brick/x.png", "1")
    assert overlay_name("brick/x.png", "1") != overlay_name("brick/x.png", "2")


def test_overlay_limits_centre_the_category_threshold():
    assert overlay_limits(1.0, 0.7) == pytest.approx((0.7, 1.3))
    assert overlay_limits(2.0, None) == pytest.approx((1.0, 3.0))  # no normals: threshold -+ 50%
    assert overlay_limits(0.0, None) == (-1.0, 1.0)
    assert overlay_limits(None, 0.5) is None


def test_overlay_png_shows_the_photo_with_the_map_above_the_scale_only():
    photo = np.full((64, 64, 3), 128, np.uint8)
    anomaly = np.full((64, 64), 0.5, np.float32)  # below the scale's low end: not drawn
    anomaly[10:30, 30:50] = 2.0  # far above the threshold: red
    data = overlay_png(photo, anomaly, (0.7, 1.3), ["brick: score 2 > threshold 1 (fpr)", "brick/x.png"],
                       marker=1.0)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.size == overlay_size(64, 2) == (MIN_SIDE_PX, MIN_SIDE_PX + 2 * 14 + 4 + 10 + 14)
    pixels = np.asarray(image).astype(int)
    top, scale = 2 * 14 + 4, MIN_SIDE_PX // 64
    quiet = pixels[top + 50 * scale, 10 * scale]
    assert np.abs(quiet - 128).max() <= 2  # the photo, untouched
    hot = pixels[top + 20 * scale, 40 * scale]
    assert hot[0] > hot[1] + 40 and hot[0] > hot[2] + 40  # red, translucent over grey
    assert pixels[:top].min() < 100  # the caption is written


def test_display_image_undoes_the_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3)).astype(np.uint8)
    normalised = ((rgb / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1).astype(np.float32)
    assert np.abs(display_image(normalised, mean, std).astype(int) - rgb).max() <= 1


def _write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_thresholds_files_in_json_and_yaml(tmp_path):
    assert read_thresholds_file(_write(tmp_path / "t.json", '{"brick": 0.85, "grass": 1}')) == {
        "brick": 0.85, "grass": 1.0}
    assert read_thresholds_file(_write(tmp_path / "t.yaml", "brick: 0.85\ngrass: 0.5e0\n")) == {
        "brick": 0.85, "grass": 0.5}


@pytest.mark.parametrize("name, text, fragment", [
    ("missing.json", None, "unreadable thresholds file"),
    ("bad.json", '{"brick": 0.8,', "unparsable thresholds file"),
    ("bad.yaml", "brick: [1, 2\n", "unparsable thresholds file"),
    ("list.yaml", "- 0.8\n", "expected a non-empty mapping"),
    ("empty.yaml", "", "expected a non-empty mapping"),
    ("word.yaml", "brick: high\n", "bad threshold"),
    ("bool.json", '{"brick": true}', "bad threshold"),
    ("nan.yaml", "brick: .nan\n", "bad threshold"),
    ("number_key.yaml", "1: 0.5\n", "is not a name"),
])
def test_bad_thresholds_files_are_one_clear_line(tmp_path, name, text, fragment):
    path = str(tmp_path / name) if text is None else _write(tmp_path / name, text)
    with pytest.raises(ConfigError, match=fragment) as info:
        read_thresholds_file(path)
    message = str(info.value)
    assert "\n" not in message and f"({'--thresholds'} {path}" in message and "; " in message


def _options(tmp_path, **extra) -> ScanOptions:
    for category in ("brick", "grass"):
        (tmp_path / "archive" / category).mkdir(parents=True, exist_ok=True)
    return ScanOptions(input=str(tmp_path / "archive"), output=str(tmp_path / "out"),
                       references=str(tmp_path / "refs"), **extra)


def test_unknown_categories_in_a_thresholds_file_are_refused(tmp_path):
    good = _write(tmp_path / "good.yaml", "brick: 0.9\n")
    given = check_threshold_options(_options(tmp_path, thresholds_file=good))
    assert given.file == {"brick": 0.9} and given.covered() == {"brick"}
    bad = _write(tmp_path / "bad.yaml", "brick: 0.9\nbrik: 0.5\nwood: 1\n")
    with pytest.raises(ConfigError, match=r"unknown categories brik, wood .*the input has brick, grass"):
        check_threshold_options(_options(tmp_path, thresholds_file=bad))
    # --category: the only category of the input
    with pytest.raises(ConfigError, match="unknown category brick"):
        check_threshold_options(_options(tmp_path, thresholds_file=good, category="tiles"))


def _earlier(tmp_path) -> str:
    base = Calibration(0.01, None, "normals/", {"name": "baseline"}, {"spec": "x"})
    calibration = calibrate({"brick": np.arange(100.0), "grass": np.arange(10.0)}, ["brick", "grass", "gone"],
                            target_fpr=0.01, base=base)
    out = tmp_path / "earlier"
    storage.atomic_write_json(str(out / "calibration.json"), calibration.to_dict())
    return str(out)


def test_an_earlier_scan_gives_its_thresholds(tmp_path):
    earlier = _earlier(tmp_path)
    run = read_earlier_run(earlier)
    assert set(run) == {"brick", "grass"}  # "gone" had no threshold
    assert run["brick"].threshold == 98.0 and run["brick"].normal_median == 49.5
    assert read_earlier_run(earlier + "/calibration.json") == run
    storage.atomic_write_json(str(tmp_path / "s" / "summary.json"), {"calibration": json.loads(
        storage.read_bytes(earlier + "/calibration.json"))})
    assert read_earlier_run(str(tmp_path / "s")) == run  # summary.json alone will do
    with pytest.raises(ConfigError, match="no earlier scan"):
        read_earlier_run(str(tmp_path / "nothing"))
    storage.atomic_write_json(str(tmp_path / "other" / "calibration.json"), {"hello": 1})
    with pytest.raises(ConfigError, match="not a scan calibration"):
        read_earlier_run(str(tmp_path / "other"))


def test_the_file_wins_over_the_earlier_run_which_wins_over_the_calibration(tmp_path):
    run = read_earlier_run(_earlier(tmp_path))
    base = Calibration(0.05, None, "n/", {}, {})
    calibration = calibrate({c: np.arange(20.0) for c in "abc"}, ["a", "b", "c"], target_fpr=0.05, base=base)
    given = GivenThresholds(file={"a": 0.25}, run={"a": run["brick"], "b": run["grass"]})
    out = apply_given(calibration, given, ["a", "b", "c"], thresholds_file="t.yaml", thresholds_from="e/")
    assert out.categories["a"] == CategoryThreshold("a", 0.25, "file")
    assert out.categories["b"].threshold == run["grass"].threshold and out.categories["b"].source == "run"
    assert out.categories["c"].source == "fpr"
    origins = describe_origins(out)
    assert origins["a"] == {"threshold": 0.25, "source": "file", "origin": "--thresholds t.yaml"}
    assert origins["b"]["origin"] == "--thresholds-from e/"
    assert origins["c"]["origin"] == "calibrated at FPR 0.05 on --normals"


def test_scan_cli_fails_fast_on_a_bad_thresholds_file(tmp_path, capfd):
    from workflows.cli import main

    (tmp_path / "archive" / "brick").mkdir(parents=True)
    bad = _write(tmp_path / "t.yaml", "brick: 0.9\nbrik: 0.5\n")
    code = main(["scan", str(tmp_path / "archive"), "--references", str(tmp_path / "refs"), "-o",
                 str(tmp_path / "out"), "--thresholds", bad, "--set", "tracking.enabled=false"])
    err = capfd.readouterr().err.strip()
    assert code == 2
    assert err == (f"residual-ad scan: error: unknown category brik (--thresholds {bad}): the input has "
                   "brick; fix the names or remove those entries")
    assert not (tmp_path / "out").exists()  # nothing started, nothing written
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()


def test_thresholds_of_another_model_are_refused(tmp_path):
    from dataclasses import asdict

    from workflows.config import load_config

    config = load_config(None, ["backbone.image_size=64"])
    base = Calibration(0.01, None, "n/", json.loads(json.dumps(asdict(config.method))),
                       json.loads(json.dumps(asdict(config.backbone))))
    calibration = calibrate({"brick": np.arange(10.0)}, ["brick"], target_fpr=0.01, base=base)
    storage.atomic_write_json(str(tmp_path / "earlier" / "calibration.json"), calibration.to_dict())
    options = _options(tmp_path, thresholds_from=str(tmp_path / "earlier"))
    assert check_threshold_options(options, config).run["brick"].threshold == 9.0
    other = load_config(None, ["backbone.image_size=96"])
    with pytest.raises(ConfigError, match=r"thresholds of another backbone \(--thresholds-from .*calibrate"):
        check_threshold_options(options, other)
