"""pytest-benchmark entry points over the same cases as `python -m interpkernels bench`.

    pytest bench --benchmark-only                 # the full shapes
    INTERPKERNELS_BENCH_QUICK=1 pytest bench      # small shapes, seconds
"""

import os

import pytest
import torch

from interpkernels.benchmarks import OPS

QUICK = os.environ.get("INTERPKERNELS_BENCH_QUICK") == "1"
DEVICE = torch.device(os.environ.get("INTERPKERNELS_BENCH_DEVICE", "cpu"))
CASES = [case for module in OPS.values() for case in module.cases(quick=QUICK)]


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.op}[{case.label}]")
@pytest.mark.parametrize("impl", ["interpkernels", "baseline"])
def test_op(benchmark, case, impl):
    implementations = case.make(DEVICE)
    ours = next(name for name in implementations if name.startswith("interpkernels"))
    fn = implementations[case.baseline if impl == "baseline" else ours]
    benchmark.group = f"{case.op} {case.label}"

    def run():
        fn()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize(DEVICE)

    benchmark.pedantic(run, rounds=3 if QUICK else 7, warmup_rounds=1)
