"""The lodo summary table: mean and sample std over seeds, from the metrics engine's aggregation."""

import math

from workflows.config import MethodConfig
from workflows.pipelines.evaluate import EvalResult, EvalSpec
from workflows.pipelines.summary import (
    defect_type_rows,
    defect_types_to_csv,
    defect_types_to_markdown,
    summary_rows,
    to_markdown,
)


def _result(seed: int, auroc: float, pixel: float | None) -> EvalResult:
    spec = EvalSpec(("textures",), MethodConfig("baseline"), 1, seed)
    metrics = {"I-AUROC": auroc, "P-AUROC": pixel}
    return EvalResult(spec, f"/tmp/job{seed}", {}, {"textures": metrics}, {})


def test_two_seeds_give_mean_and_sample_std():
    rows = summary_rows([_result(0, 0.8, 0.9), _result(1, 0.6, 0.7)])
    (row,) = rows
    assert row["seeds"] == 2
    assert math.isclose(row["I-AUROC_mean"], 0.7)
    assert math.isclose(row["I-AUROC_std"], math.sqrt(0.02))  # ddof=1
    assert "70.0 ± 14.1" in to_markdown(rows)


def test_one_seed_has_no_std_and_undefined_metrics_say_na():
    rows = summary_rows([_result(0, 0.8, None)])
    (row,) = rows
    assert row["I-AUROC_std"] is None and row["P-AUROC_mean"] is None
    table = to_markdown(rows)
    assert "| 80.0 |" in table and "±" not in table and "n/a" in table


def _typed(seed: int, scratch: float, dent: float | None) -> EvalResult:
    spec = EvalSpec(("textures",), MethodConfig("baseline"), 1, seed)
    per_type = {"textures/brick": {"scratch": {"I-AUROC": scratch, "P-AUROC": 0.5},
                                   "dent": {"I-AUROC": dent, "P-AUROC": None}}}
    return EvalResult(spec, f"/tmp/job{seed}", {}, {}, {}, per_defect_type=per_type)


def test_defect_type_rows_average_each_type_over_seeds():
    rows = defect_type_rows([_typed(0, 0.8, 1.0), _typed(1, 0.6, 0.9)])
    assert [(r["category"], r["defect_type"]) for r in rows] == [("brick", "dent"), ("brick", "scratch")]
    dent, scratch = rows
    assert dent["dataset"] == "textures" and dent["method"] == "baseline" and dent["k"] == 1
    assert math.isclose(scratch["I-AUROC_mean"], 0.7)
    assert math.isclose(scratch["I-AUROC_std"], math.sqrt(0.02))
    assert math.isclose(dent["I-AUROC_mean"], 0.95) and dent["P-AUROC_mean"] is None
    table = defect_types_to_markdown(rows)
    assert "| textures | brick | scratch | baseline | 1 | 2 | 70.0 ± 14.1 |" in table
    assert "| textures | brick | dent | baseline | 1 | 2 | 95.0 ± 7.1 |" in table
    csv_text = defect_types_to_csv(rows)
    assert csv_text.splitlines()[0].startswith("dataset,category,defect_type,method,k,seeds,I-AUROC_mean")
    assert len(csv_text.splitlines()) == 3
