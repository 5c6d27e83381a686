"""`residual-ad predict` without Ray: bad input is one line and exit 2 before any model is built; folder
references; a set-normalised method says it runs in its batch-independent mode."""

from __future__ import annotations

import csv

import pytest

from tests.workflows.pipelines.tiny_data import EVAL_BASE, write_tiny
from workflows.cli import main
from workflows.datasets.reader import read_table

SETS = [item for override in EVAL_BASE for item in ("--set", override)]
RESADPP = ('method={"name": "resadpp", "params": {"num_embeddings": 16, "coupling_layers": 2, '
           '"pos_embed_dim": 16}}')


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny dataset, and folders of its textures/brick train normals and test images."""
    root = tmp_path_factory.mktemp("predict")
    data = write_tiny(str(root / "data"))
    for split in ("train", "test"):
        folder = root / split
        folder.mkdir()
        table = read_table(data, columns=["image_id", "image"],
                           filters=[("dataset", "==", "textures"), ("category", "==", "brick"),
                                    ("split", "==", split)])
        for image_id, image in zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True):
            (folder / f"{image_id[:8]}.png").write_bytes(image)
    return root


def _error(capsys, argv: list[str]) -> str:
    code = main(["predict", *argv, *SETS])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("residual-ad predict: error: "), err
    return err


def test_no_images(tiny, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("no image here")
    err = _error(capsys, [str(tmp_path), "--references", str(tiny / "train")])
    assert "no images (images)" in err


def test_missing_input(tiny, tmp_path, capsys):
    err = _error(capsys, [str(tmp_path / "nope.png"), "--references", str(tiny / "train")])
    assert "not found (images)" in err


def test_unreadable_image(tiny, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    err = _error(capsys, [str(tmp_path), "--references", str(tiny / "train")])
    assert "unreadable image (images: " in err and "broken.png" in err and "fix or remove it" in err


def test_symlink_out_of_the_folder_is_refused(tiny, tmp_path, capsys):
    (tmp_path / "escape.png").symlink_to(next((tiny / "test").iterdir()))
    err = _error(capsys, [str(tmp_path), "--references", str(tiny / "train")])
    assert "symlink escapes the archive (not followed)" in err and "escape.png" in err


def test_fewer_references_than_k(tiny, capsys):
    err = _error(capsys, [str(tiny / "test"), "--references", str(tiny / "data"), "--category", "brick",
                          "--k", "10"])
    assert "too few references (--k=10): textures/brick has 4 normal train images" in err
    err = _error(capsys, [str(tiny / "test"), "--references", str(tiny / "train"), "--k", "5"])
    assert "too few references (--k=5)" in err and "4 distinct images" in err


def test_dataset_references_need_a_known_category(tiny, capsys):
    assert "no category (--category)" in _error(capsys, [str(tiny / "test"), "--references",
                                                         str(tiny / "data")])
    assert "unknown category 'nope' (--category)" in _error(
        capsys, [str(tiny / "test"), "--references", str(tiny / "data"), "--category", "nope"])


def test_missing_checkpoint(tiny, capsys):
    err = _error(capsys, [str(tiny / "test"), "--references", str(tiny / "train"),
                          "--set", f"method.checkpoint={tiny / 'no-checkpoint'}"])
    assert "missing checkpoint (method.checkpoint)" in err


def test_folder_references_and_batch_independent_mode(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["predict", str(tiny / "test"), "--references", str(tiny / "train"), "--k", "2",
                 "--output", str(out), *SETS, "--set", RESADPP])
    printed = capsys.readouterr().out.splitlines()
    assert code == 0
    assert "2 image(s) of" in printed[0] and "batch-independent" in printed[0]
    with open(out / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(list((tiny / "test").iterdir())) == len(printed) - 2
    assert all(row["anomalous"] == "" for row in rows)  # no threshold: no verdict
    assert all((out / row["overlay"]).is_file() for row in rows)


def test_bad_k(tiny, capsys):
    assert "bad k (--k=0)" in _error(capsys, [str(tiny / "test"), "--references", str(tiny / "train"),
                                              "--k", "0"])


def test_overlay_names_are_stems_made_unique():
    from workflows.pipelines.predict import overlay_names

    names = overlay_names(["a.png", "a.jpg", "sub dir/b.PNG"], ["11111111aa", "22222222bb", "33333333cc"])
    assert names == ["a_11111111.png", "a_22222222.png", "sub_dir_b.png"]


def test_overlay_draws_the_map_only_above_the_runs_median():
    import numpy as np

    from workflows.reports.gallery import GalleryTile, compose_tile
    from workflows.reports.overlay import run_map_limits

    image = np.full((32, 32, 3), 100, np.uint8)
    amap = np.zeros((32, 32), np.float32)
    amap[8:16, 8:16] = 1.0
    limits = run_map_limits([amap, np.zeros_like(amap)])
    assert limits[0] == 0.0 and limits[1] == 1.0
    rgb = compose_tile(GalleryTile(image, amap + 0.0, None, ""), (0.5, 1.0), size=32, floor=0.5)
    np.testing.assert_allclose(rgb[0, 0], 100 / 255)  # below the floor: the photo untouched
    assert not np.allclose(rgb[12, 12], 100 / 255)  # the hot square coloured
