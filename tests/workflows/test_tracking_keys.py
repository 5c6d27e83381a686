"""Metric keys of the tracking runs (no MLflow needed): per category, per dataset, per defect type, and the
mean/std keys of a summary parent."""

from __future__ import annotations

from workflows.tracking import eval_metrics, summary_metrics


def test_eval_metrics_keys_include_defect_types_and_skip_undefined():
    per_category = {"textures/brick": {"I-AUROC": 0.5, "AUPRO@0.3": None}}
    per_dataset = {"textures": {"I-AUROC": 0.5, "AUPRO@0.3": None}}
    per_defect_type = {"textures/brick": {"crack": {"I-AUROC": 0.75}, "hole/big": {"I-AUROC": None}}}
    keys = eval_metrics(per_category, per_dataset, ("I-AUROC", "AUPRO@0.3"), per_defect_type)
    assert keys == {"textures/brick/I-AUROC": 0.5, "textures/I-AUROC": 0.5,
                    "textures/brick/crack/I-AUROC": 0.75}


def test_summary_metrics_mean_and_defined_std_only():
    from workflows.pipelines.evaluate import METRIC_NAMES

    row = {"dataset": "elpv", "method": "baseline", "k": 1, "seeds": 1,
           **{f"{m}_{s}": None for m in METRIC_NAMES for s in ("mean", "std")}}
    row["I-AUROC_mean"], row["AUPRO@0.3_mean"] = 0.9, 0.4
    assert summary_metrics([row]) == {"elpv/baseline/k1/I-AUROC_mean": 0.9,
                                      "elpv/baseline/k1/AUPRO_0.3_mean": 0.4}
