"""Comparison against float64 oracles with docs/OPS.md tolerances, shared by the tests."""

import torch

LOW_PRECISION = (torch.bfloat16, torch.float16)
ALL_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest absolute difference, on the oracle's device (oracles are computed on the CPU)."""
    return (actual.double().to(oracle.device) - oracle.double()).abs().max().item() if oracle.numel() else 0.0


def assert_matches_oracle(actual: torch.Tensor, oracle: torch.Tensor, torch_same_dtype: torch.Tensor | None = None):
    """docs/OPS.md tolerances against a float64 oracle.

    float64: 1e-12 and float32: 1e-5 relative to the oracle's largest entry.
    float16 / bfloat16: at most twice the error torch itself makes computing the
    same thing in that dtype (`torch_same_dtype`), as flash-attention tests.
    """
    assert actual.shape == oracle.shape, (actual.shape, oracle.shape)
    assert oracle.dtype == torch.float64
    if oracle.numel() == 0:
        return
    scale = max(oracle.abs().max().item(), 1e-30)
    error = max_error(actual, oracle)
    if actual.dtype == torch.float64:
        assert error <= 1e-12 * scale, f"float64 error {error:.3g} vs scale {scale:.3g}"
    elif actual.dtype == torch.float32:
        assert error <= 1e-5 * scale, f"float32 error {error:.3g} vs scale {scale:.3g}"
    else:
        assert torch_same_dtype is not None and torch_same_dtype.dtype == actual.dtype
        torch_error = max_error(torch_same_dtype, oracle)
        # The float32-eps term only matters where torch happens to be exact.
        bound = 2 * torch_error + torch.finfo(torch.float32).eps * scale
        assert error <= bound, f"{actual.dtype} error {error:.3g} > 2 x torch's {torch_error:.3g}"
