"""The benchmark machinery itself (no timing is asserted): every case builds,
every implementation of a case computes the same thing, and the table and
CSV carry what the README promises."""

import csv

import pytest
import torch

from interpkernels.benchmarks import OPS, sparse_decode, topk_encode
from interpkernels.benchmarks.harness import FloorRates, format_table, run_cases, write_csv
from interpkernels.benchmarks.plots import sweeps, write_plots

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
        if row["op"] in ("topk_encode", "sparse_decode", "masked_component_forward"):  # cases that state their cost
            assert float(row["floor_ms"]) > 0 and float(row["floor_fraction"]) > 0
    assert "of floor" in table


def test_floor_is_the_slower_of_compute_and_memory():
    rates = FloorRates({"torch.float32": 1e12}, 1e11)
    assert rates.floor_ms((2e9, 1e6), "torch.float32") == pytest.approx(2.0)  # compute bound
    assert rates.floor_ms((2e6, 1e9), "torch.float32") == pytest.approx(10.0)  # memory bound
    flops, moved = topk_encode.cost("forward", torch.bfloat16, N=16384, d=4096, M=131072, k=32)
    assert flops == 2 * 16384 * 4096 * 131072
    assert moved == 2 * (16384 * 4096 + 131072 * 4096 + 131072) + 16384 * 32 * 10


def test_gpu_cases_cover_the_spec_shapes_and_baselines():
    cases = topk_encode.gpu_cases() + sparse_decode.gpu_cases()
    params = [case.params for case in cases]
    assert {p["d"] for p in params} == {768, 2304, 4096} and max(p["M"] for p in params) == 131072
    assert {32, 64, 128} <= {p["k"] for p in params}
    assert {p["dtype"] for p in params} == {"torch.bfloat16", "torch.float32"}
    assert all(case.cost is not None for case in cases)


def test_plots_draw_each_sweep(tmp_path):
    cases = [topk_encode.case("forward", torch.float32, N=64, d=16, M=M, k=4) for M in (128, 256)]
    measurements = run_cases(cases, torch.device("cpu"), repeats=1, log=lambda line: None)
    found = sweeps(measurements)
    assert [key[-1] for key in found] == ["M"]
    paths = write_plots(measurements, tmp_path, "run")
    assert [path.name for path in paths] == ["run-topk_encode-forward-vs-M.png"]
    assert paths[0].stat().st_size > 0
