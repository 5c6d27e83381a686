"""Per-dataset and over-seeds aggregation with reasons instead of numbers."""

import pytest

from residual_core.metrics.summary import summarize_dataset, summarize_runs


def test_dataset_mean_skips_undefined_categories_and_says_so():
    per_category = {
        "bottle": {"I-AUROC": 0.9, "P-AUROC": 0.8, "not_defined": {}},
        "cable": {"I-AUROC": 0.7, "P-AUROC": None, "not_defined": {"P-AUROC": "no anomalous pixels"}},
    }
    summary = summarize_dataset(per_category)
    assert summary["I-AUROC"] == pytest.approx(0.8)
    assert summary["P-AUROC"] == pytest.approx(0.8)
    assert summary["excluded"]["P-AUROC"] == {"cable": "no anomalous pixels"}
    only_undefined = summarize_dataset({"cable": per_category["cable"]})
    assert only_undefined["P-AUROC"] is None and "any category" in only_undefined["not_defined"]["P-AUROC"]


def test_runs_mean_and_sample_std():
    runs = [{"I-AUROC": 0.8, "AUPRO@0.3": None}, {"I-AUROC": 0.9, "AUPRO@0.3": 0.5},
            {"I-AUROC": 1.0, "AUPRO@0.3": 0.6}]
    summary = summarize_runs(runs)
    assert summary["mean"]["I-AUROC"] == pytest.approx(0.9)
    assert summary["std"]["I-AUROC"] == pytest.approx(0.1)
    assert summary["mean"]["AUPRO@0.3"] is None and "runs [0]" in summary["not_defined"]["AUPRO@0.3"]
    single = summarize_runs(runs[1:2])
    assert single["std"]["I-AUROC"] is None and "two runs" in single["not_defined"]["std:I-AUROC"]
    with pytest.raises(ValueError):
        summarize_runs([])
