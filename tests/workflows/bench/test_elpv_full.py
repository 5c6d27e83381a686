"""Full-scale `elpv`: trivial statistics stay blind, and the defective cells left out are accounted for."""

from __future__ import annotations

import collections

import pytest
from sklearn.metrics import roc_auc_score

from tests.workflows.bench.helpers import bench_manifest, decode, rows
from tests.workflows.bench.test_leaks import BAND
from workflows.bench import BenchConfig, build_bench
from workflows.bench.elpv import CATEGORIES, read_labels


@pytest.fixture(scope="module")
def full_elpv(tmp_path_factory):
    """(rows, manifest) of a full-scale build of the elpv dataset only (about 10 s)."""
    url = str(tmp_path_factory.mktemp("bench") / "elpv-full")
    build_bench(url, BenchConfig(seed=0, scale="full", datasets=("elpv",)))
    return rows(url), bench_manifest(url)


def test_size_and_mean_intensity_alone_do_not_separate_the_classes_at_full_scale(full_elpv):
    table, _ = full_elpv
    groups = collections.defaultdict(list)
    for row in table:
        if row["split"] == "test":
            groups[row["category"]].append(row)
    assert set(groups) == set(CATEGORIES)
    failures = []
    for category, test in sorted(groups.items()):
        labels = [r["label"] for r in test]
        size = roc_auc_score(labels, [len(r["image"]) for r in test])
        mean = roc_auc_score(labels, [float(decode(r["image"]).mean()) for r in test])
        if not (BAND[0] <= size <= BAND[1] and BAND[0] <= mean <= BAND[1]):
            failures.append(f"elpv/{category}: size AUROC {size:.3f}, mean-intensity AUROC {mean:.3f}")
    assert not failures, failures


def test_left_out_defective_cells_are_listed_and_in_no_split(full_elpv):
    table, manifest = full_elpv
    labels = read_labels()
    used = {s["source"] for s in manifest["samples"]}
    for category in CATEGORIES:
        section = manifest["categories"][f"elpv/{category}"]
        counts, left_out = section["counts"], section["defective_left_out"]["sources"]
        of_type = [c for c in labels if c.cell_type == category]
        broken = {f"elpv_dataset/{c.relpath}" for c in of_type if c.probability == 1.0}
        normal = {f"elpv_dataset/{c.relpath}" for c in of_type if c.probability == 0.0}
        assert counts["defective_left_out"] == len(left_out) < len(broken)
        assert counts["test_defective"] + len(left_out) == len(broken)
        assert set(left_out) <= broken and used.isdisjoint(left_out)
        assert counts["test_normal"] == counts["test_defective"] > 100
        mine = [s for s in manifest["samples"] if s["category"] == category]
        train = {s["source"] for s in mine if s["split"] == "train"}
        test = {s["source"] for s in mine if s["split"] == "test"}
        # references: every normal cell that is not in the test split, and nothing else
        assert train.isdisjoint(test) and train == normal - test
    assert all(r["label"] == 0 for r in table if r["split"] == "train")
