"""The benchmark machinery itself (no timing is asserted): every case builds,
every implementation of a case computes the same thing, and the table and
CSV carry what the README promises."""

import csv

import pytest
import torch

from interpkernels.benchmarks import OPS
from interpkernels.benchmarks.harness import format_table, run_cases, write_csv

QUICK_CASES = [case for module in OPS.values() for case in module.cases(quick=True)]
# Cases whose implementations compute one function (the training-step case compares different models).
SAME_FUNCTION_CASES = [case for case in QUICK_CASES if case.op != "sae_training_step"]


@pytest.mark.parametrize("case", SAME_FUNCTION_CASES, ids=lambda case: case.op)
def test_implementations_of_a_case_agree(case):
    results = {name: fn() for name, fn in case.make(torch.device("cpu")).items()}
    baseline = results.pop(case.baseline)
    for name, result in results.items():
        for got, want in zip(result, baseline) if isinstance(baseline, tuple) else [(result, baseline)]:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_table_and_csv(tmp_path):
    measurements = run_cases(QUICK_CASES, torch.device("cpu"), repeats=2, log=lambda line: None)
    table = format_table(measurements)
    assert "speed-up vs baseline" in table and "(baseline)" in table
    path = tmp_path / "results.csv"
    write_csv(measurements, path, torch.device("cpu"))
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(measurements)
    for row in rows:
        assert row["machine"] and row["torch"] == torch.__version__ and row["commit"] and row["date"]
        assert float(row["median_ms"]) > 0 and int(row["repeats"]) == 2
        if row["impl"] == row["baseline"]:
            assert float(row["speedup_vs_baseline"]) == 1.0
