"""The CPU kernels' instruction-set levels: chosen by INTERPKERNELS_CPU_ISA or
set_cpu_isa, and bit for bit the same results at every level."""

import pytest
import torch
from processes import run_python

import interpkernels

ops = torch.ops.interpkernels
ISAS = interpkernels.supported_cpu_isas()
# Widths around the 16-lane blocks of the canonical dot, and one of several blocks.
WIDTHS = (1, 15, 16, 17, 100)


def at_every_isa(compute):
    """compute()'s outputs at every level this CPU runs."""
    previous = interpkernels.cpu_isa()
    try:
        results = {}
        for isa in ISAS:
            interpkernels.set_cpu_isa(isa)
            results[isa] = compute()
        return results
    finally:
        interpkernels.set_cpu_isa(previous)


def assert_bitwise_equal_across_isas(results):
    baseline = results["baseline"]
    for isa, outputs in results.items():
        for got, want in zip(outputs, baseline):
            # Compared as bits: NaN == NaN, and -0.0 != +0.0.
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), f"{isa} differs from baseline"


def test_the_widest_supported_level_is_the_default_and_baseline_always_runs():
    assert ISAS[-1] == "baseline"
    assert interpkernels.build_info()["cpu_isa"] in ISAS


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_sparse_products_are_bitwise_equal_at_every_level(d, dtype):
    N, M, k = 13, 50, 6
    values = torch.randn(N, k).to(dtype)
    indices = torch.randint(0, M, (N, k))
    W = torch.randn(M, d).to(dtype)
    dense = torch.randn(N, d).to(dtype)
    bias = torch.randn(d).to(dtype)
    results = at_every_isa(lambda: (
        ops.sparse_decode(values, indices, W, bias),
        ops.gathered_dot(dense, indices, W),
        *ops.sparse_transpose_matmul(values, indices, dense, M),
    ))
    assert_bitwise_equal_across_isas(results)


@pytest.mark.parametrize("d", WIDTHS)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_topk_encode_is_bitwise_equal_at_every_level(d, dtype):
    N, M, k = 11, 2100, 9  # latents in two GEMM tiles
    x = torch.randn(N, d).to(dtype)
    W = (torch.randn(M, d) / d**0.5).to(dtype)
    b = torch.randn(M).to(dtype)
    threshold = torch.rand(M)
    results = at_every_isa(lambda: (
        *interpkernels.topk_encode(x, W, b, k),
        *interpkernels.topk_encode(x, W, b, k, threshold=threshold),
    ))
    assert_bitwise_equal_across_isas(results)


def test_environment_variable_selects_the_level_at_import():
    done = run_python("import interpkernels; print(interpkernels.cpu_isa())", INTERPKERNELS_CPU_ISA="baseline")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "baseline"


def test_unknown_level_fails_the_import_naming_the_choices():
    done = run_python("import interpkernels", INTERPKERNELS_CPU_ISA="sse9")
    assert done.returncode != 0
    assert "ValueError" in done.stderr
    assert f"expected one of the levels this CPU runs ({', '.join(ISAS)}), got 'sse9'" in done.stderr


def test_set_cpu_isa_refuses_an_unknown_level():
    with pytest.raises(ValueError, match="got 'avx1024'"):
        interpkernels.set_cpu_isa("avx1024")
    assert interpkernels.cpu_isa() in ISAS
