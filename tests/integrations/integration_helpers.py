"""Helpers for the adapter tests in tests/integrations.

Imported by module name (tests/ holds no packages). There is deliberately no
conftest.py here: tests/ has one that the other test modules import as
``conftest``, and a second one would shadow it in sys.modules.

The peers (eai-sparsify, sae-lens, dictionary-learning) are optional: each test
module importorskips its library, so a missing one shows up as a skip with its
reason. setup_helpers/peer-requirements.txt installs all three.
"""

from __future__ import annotations

import interpkernels
import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """docs/OPS.md tolerances for float32: max |actual - expected| <= rtol * max |expected|
    (plus a float32 eps floor for tensors that are all zero or nearly so)."""
    if expected.is_sparse:
        expected = expected.to_dense()
    if actual.is_sparse:
        actual = actual.to_dense()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (what, actual.dtype, expected.dtype)
    actual64, expected64 = actual.detach().double(), expected.detach().double()
    scale = expected64.abs().max().item() if expected64.numel() else 0.0
    error = (actual64 - expected64).abs().max().item() if expected64.numel() else 0.0
    bound = rtol * scale + torch.finfo(torch.float32).eps * 1e-3
    assert error <= bound, f"{what}: max error {error:.3g} > {bound:.3g} (scale {scale:.3g})"


def assert_grads_close(patched: torch.nn.Module, reference: torch.nn.Module, names=None, rtol: float = 1e-5) -> None:
    ref_params = dict(reference.named_parameters())
    checked = 0
    for name, param in patched.named_parameters():
        if names is not None and name not in names:
            continue
        ref_grad = ref_params[name].grad
        assert param.grad is not None and ref_grad is not None, name
        assert ref_grad.abs().max() > 0, f"{name}: the reference gradient is zero, nothing is tested"
        assert_close(param.grad, ref_grad, rtol, what=f"grad {name}")
        checked += 1
    assert checked > 0


def dense_code(values: torch.Tensor, indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    """Order-insensitive view of a sparse code."""
    return values.new_zeros(*values.shape[:-1], num_latents).scatter(-1, indices, values)


def randomize_(module: torch.nn.Module, std: float = 0.3) -> torch.nn.Module:
    """Random, non-zero float32 parameters (biases included)."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, std)
    return module


def count_op_calls(monkeypatch) -> dict[str, list]:
    """Wraps interpkernels.topk_encode and interpkernels.sparse_decode (the
    adapters look them up at call time) to record each call's arguments."""
    calls: dict[str, list] = {"topk_encode": [], "sparse_decode": []}
    for name in calls:
        real = getattr(interpkernels, name)

        def wrapper(*args, _real=real, _name=name, **kwargs):
            calls[_name].append((args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(interpkernels, name, wrapper)
    return calls
