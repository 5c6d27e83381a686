"""`residual-ad build-bench` from the command line, and writing to s3:// on the local S3 server."""

from __future__ import annotations

import collections

from tests.fixtures.s3 import FAKE_SECRET
from tests.workflows.bench.helpers import bench_manifest, rows
from workflows.cli import main


def test_cli_writes_a_subset_with_uncertain_elpv_cells(tmp_path, capsys):
    dest = str(tmp_path / "cli")
    assert main(["build-bench", dest, "--seed", "2", "--datasets", "elpv", "--elpv-uncertain"]) == 0
    out = capsys.readouterr().out
    assert "elpv/mono" in out and "AUROC size" in out
    types = collections.Counter((r["category"], r["defect_type"], r["label"]) for r in rows(dest))
    for category in ("mono", "poly"):
        assert types[(category, "uncertain_p33", 1)] > 0 and types[(category, "uncertain_p67", 1)] > 0
        assert types[(category, "defective", 1)] > 0
    assert {s["dataset"] for s in bench_manifest(dest)["samples"]} == {"elpv"}


def test_cli_rejects_unknown_dataset_clearly(tmp_path, capsys):
    assert main(["build-bench", str(tmp_path / "x"), "--datasets", "mvtec"]) == 2
    assert "unknown bench dataset" in capsys.readouterr().err


def test_build_bench_writes_to_s3(s3_server, capsys):
    url = s3_server.unique_url("bench")
    assert main(["build-bench", url, "--seed", "0"]) == 0
    data = rows(url)
    assert {r["dataset"] for r in data} == {"textures", "photos", "elpv"}
    assert len(data) == len(bench_manifest(url)["samples"])
    captured = capsys.readouterr()
    assert FAKE_SECRET not in captured.out + captured.err
