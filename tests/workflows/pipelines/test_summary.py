"""The lodo summary table: mean and sample std over seeds, from the metrics engine's aggregation."""

import math

from workflows.config import MethodConfig
from workflows.pipelines.evaluate import EvalResult, EvalSpec
from workflows.pipelines.summary import summary_rows, to_markdown


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
