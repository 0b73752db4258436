"""error_attribution: the attribution patching (AtP) score of an SAE's error node.

    attr[n] = (eps_p - eps_c)[n] . grad[n]

eps = x - x_hat, the part of the activation the dictionary does not explain.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels


def error_attribution(
    clean_error: torch.Tensor,
    patched_error: torch.Tensor,
    grad: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Row-wise ``((patched_error - clean_error) * grad).sum(-1)``.

    Args:
        clean_error, patched_error: ``[..., d]`` SAE errors of the two runs.
        grad: ``[..., d]`` metric gradient at the SAE site (clean run).
        backend: which implementation runs (interpkernels._backends).

    Returns ``[...]`` float32 (float64 for float64 inputs); differentiable in all three.
    """
    grad = v.require_float("grad", grad)
    if grad.dim() < 1:
        raise ValueError(f"grad: expected a tensor of shape [..., d], got {v.describe(grad)}")
    shape_text = f"{list(grad.shape)} (the shape of grad)"
    for name, error in (("clean_error", clean_error), ("patched_error", patched_error)):
        v.require_float(name, error, grad.device)
        v.require_shape(name, error, grad.shape, shape_text)
    v.require_same_device("grad", grad, clean_error=clean_error, patched_error=patched_error)
    clean_error, patched_error, grad = v.autocast_inputs(grad.device, clean_error, patched_error, grad)
    v.require_same_dtype("grad", grad, clean_error=clean_error, patched_error=patched_error)
    backend = resolve("error_attribution", backend, grad.device)
    if backend == "torch":
        return reference.error_attribution(clean_error, patched_error, grad)
    flat_shape = (math.prod(grad.shape[:-1]), grad.shape[-1])  # spelled out: reshape(0, -1) is ambiguous
    flat = [t.reshape(flat_shape) for t in (clean_error, patched_error, grad)]
    return kernels(backend).error_attribution(*flat).view(grad.shape[:-1])


def _error_attribution_fake(clean_error, patched_error, grad):
    return grad.new_empty(grad.shape[0], dtype=reference.attribution_dtype(grad.dtype))


def _error_attribution_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _register(ops: Kernels) -> None:
    """Fake implementation and autograd of one backend's error_attribution:
    d out[n] / d eps_p[n] = grad[n] = -d out[n] / d eps_c[n], d out[n] / d grad[n] = eps_p[n] - eps_c[n]."""

    def backward(ctx, grad_out):
        clean_error, patched_error, grad = ctx.saved_tensors
        needs = ctx.needs_input_grad
        scale = grad_out.unsqueeze(-1)
        grad_patched = (scale * grad).to(grad.dtype) if needs[0] or needs[1] else None
        grad_clean = -grad_patched if needs[0] else None
        grad_grad = (scale * (patched_error - clean_error)).to(grad.dtype) if needs[2] else None
        return grad_clean, grad_patched if needs[1] else None, grad_grad

    torch.library.register_fake(ops.error_attribution, _error_attribution_fake)
    torch.library.register_autograd(ops.error_attribution, backward, setup_context=_error_attribution_setup)


_register(NATIVE)
_register(TRITON)
