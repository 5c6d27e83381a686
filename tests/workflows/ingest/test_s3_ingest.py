"""Ingest into s3:// on a real moto server and read back through the user code path; no secret leaks."""

from __future__ import annotations

from tests.fixtures.s3 import FAKE_SECRET
from tests.workflows.ingest.trees import build_defect_tree, build_folder_tree
from workflows import storage
from workflows.cli import main
from workflows.datasets import iter_batches, list_partitions, read_table


def test_ingest_to_s3_and_read_back(s3_server, tmp_path, capsys):
    src = tmp_path / "parts"
    build_folder_tree(src)
    dest = s3_server.unique_url("ingested")
    assert main(["ingest", "--format", "folder", "--no-progress", str(src), dest]) == 0
    assert main(["ingest", "--format", "folder", "--no-progress", str(src), dest]) == 0  # re-ingest
    table = read_table(dest)
    assert table.num_rows == 16
    assert ("parts", "tile", "unlabeled") in list_partitions(dest)
    assert sum(b.num_rows for b in iter_batches(dest, columns=["image_id"], batch_size=5)) == 16
    assert main(["summary", dest]) == 0
    printed = capsys.readouterr()
    for text in (
        printed.out, printed.err,
        storage.read_bytes(storage.join(dest, "_manifest.json")).decode(),
        storage.read_bytes(storage.join(dest, "_quarantine", "parts.json")).decode(),
    ):
        assert FAKE_SECRET not in text


def test_ingest_from_an_s3_source(s3_server, tmp_path):
    local = tmp_path / "mv"
    build_defect_tree(local, categories=("bottle",))
    source = s3_server.unique_url("source")
    fs, root = storage.resolve(source)
    fs.put(str(local) + "/", root, recursive=True)
    dest = s3_server.unique_url("from-s3")
    assert main(["ingest", "--format", "mvtec", "--no-progress", source, dest]) == 0
    assert read_table(dest, filters=[("label", "==", 1)]).num_rows == 4
