"""No trivial statistic tells normal from defective test images, in any category."""

from __future__ import annotations

import collections

import pytest
from sklearn.metrics import roc_auc_score

from tests.workflows.bench.helpers import decode, rows

BAND = (0.35, 0.65)


def _by_category(url):
    groups = collections.defaultdict(list)
    for row in rows(url):
        if row["split"] == "test":
            groups[(row["dataset"], row["category"])].append(row)
    return groups


def test_file_size_and_mean_intensity_alone_do_not_separate_the_classes(small_bench):
    url, summary = small_bench
    groups = _by_category(url)
    assert len(groups) == 9
    failures = []
    for key, test in sorted(groups.items()):
        labels = [r["label"] for r in test]
        assert set(labels) == {0, 1}, key
        size = roc_auc_score(labels, [len(r["image"]) for r in test])
        mean = roc_auc_score(labels, [float(decode(r["image"]).mean()) for r in test])
        if not (BAND[0] <= size <= BAND[1] and BAND[0] <= mean <= BAND[1]):
            failures.append(f"{key}: size AUROC {size:.3f}, mean-intensity AUROC {mean:.3f}")
        # the figures written into the manifest agree with an independent computation
        figures = summary.categories[f"{key[0]}/{key[1]}"]
        assert figures["auroc_encoded_size"] == pytest.approx(size, abs=1e-3)
    assert not failures, failures
