"""masked_component_forward: SPD's forward through a decomposed linear layer (SPEC section 5),

    y = (h * mask) @ U + delta_mask[:, None] * (x @ W_delta^T) + bias,

h = x @ V the component activations, mask in [0, 1] (SPD: m = g + (1 - g) r),
W_delta = W_target - (V U)^T the part of the target the components miss.
Native: one registered op (csrc/masked_component_forward.cpp, ATen GEMMs on
any device: BLAS on CPU, cuBLAS on CUDA); Triton: one fused kernel
(triton_kernels/masked_component_forward.py) that writes neither h * mask nor
x W_delta^T. The backward, the same torch ops for both, with g = grad_out:
    dh_m = g @ U^T,  grad_h = dh_m * mask,  grad_mask = dh_m * h,  grad_U = (h * mask)^T g,
    g_d = delta_mask * g,  grad_x = g_d @ W_delta = delta_mask * (g @ W_delta),  grad_W_delta = g_d^T x,
    grad_delta_mask = rowsum(g * (x @ W_delta^T)) = rowsum((g @ W_delta) * x),  grad_bias = sum_n g.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels


def masked_component_forward(
    x: torch.Tensor,
    h: torch.Tensor,
    mask: torch.Tensor,
    U: torch.Tensor,
    *,
    W_delta: torch.Tensor | None = None,
    delta_mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """SPD's masked layer output ``[..., d_out]``.

    Args:
        x: ``[..., d_in]`` the layer's input.
        h: ``[..., C]`` (rank 1) or ``[..., C, m]`` (rank m) component activations.
        mask: ``[..., C]`` one mask value per component and token.
        U: ``[C, d_out]`` or ``[C, m, d_out]`` (B).
        W_delta: optional ``[d_out, d_in]`` weight delta; delta_mask: optional ``[...]`` its mask per token.
        bias: optional ``[d_out]``.
        backend: which implementation runs (interpkernels._backends; "auto" takes the
            native op on CUDA too: the Triton kernel has not yet been timed against cuBLAS).
    Differentiable in every tensor argument.
    """
    v.require_float("x", x)
    for name, tensor in (("h", h), ("mask", mask), ("U", U), ("W_delta", W_delta), ("delta_mask", delta_mask),
                         ("bias", bias)):
        if tensor is not None:
            v.require_float(name, tensor, x.device)
    if U.dim() not in (2, 3):
        raise ValueError(f"U: expected shape [C, d_out] or [C, m, d_out], got {v.describe(U)}")
    leading = x.shape[:-1]
    C, m, d_out = U.shape[0], (1 if U.dim() == 2 else U.shape[1]), U.shape[-1]
    expected_h = (*leading, C) if U.dim() == 2 else (*leading, C, m)
    v.require_shape("h", h, expected_h, f"{list(expected_h)} (leading dims of x, components of U)")
    v.require_shape("mask", mask, (*leading, C), f"{[*leading, C]} (leading dims of x, C of U)")
    if delta_mask is not None:
        if W_delta is None:
            raise ValueError("delta_mask: given without W_delta")
        v.require_shape("delta_mask", delta_mask, tuple(leading), f"{list(leading)} (leading dims of x)")
    v.require_same_device("x", x, h=h, mask=mask, U=U, W_delta=W_delta, delta_mask=delta_mask, bias=bias)
    x, h, mask, U, W_delta, delta_mask, bias = v.autocast_inputs(x.device, x, h, mask, U, W_delta, delta_mask, bias)
    v.require_same_dtype("x", x, h=h, mask=mask, U=U, W_delta=W_delta, delta_mask=delta_mask, bias=bias)
    backend = resolve("masked_component_forward", backend, x.device)
    if backend == "torch":
        return reference.masked_component_forward(x, h, mask, U, W_delta, delta_mask, bias)
    N = math.prod(leading)
    flat_h, flat_mask = h.reshape(N, C * m), mask.reshape(N, C)
    if m > 1:  # each piece r of component c takes the component's mask
        flat_mask = flat_mask.repeat_interleave(m, dim=1)
    out = kernels(backend).masked_component_forward(
        x.reshape(N, x.shape[-1]), flat_h, flat_mask, U.reshape(C * m, d_out), W_delta,
        None if delta_mask is None else delta_mask.reshape(N), bias)
    return out.view(*leading, d_out)


def _fake(x, h, mask, U, W_delta, delta_mask, bias):
    return x.new_empty(x.shape[0], U.shape[1])


def _setup(ctx, inputs, output):
    x, h, mask, U, W_delta, delta_mask, bias = inputs
    ctx.save_for_backward(x, h, mask, U, W_delta, delta_mask)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    """The module docstring's gradients. grad_delta_mask reads g @ W_delta, which grad_x
    needs anyway, instead of recomputing x @ W_delta^T (one GEMM fewer); grad_U comes
    first so that its h * mask is freed before the [N, C] gradients exist."""
    x, h, mask, U, W_delta, delta_mask = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x = grad_h = grad_mask = grad_U = grad_W_delta = grad_delta_mask = grad_bias = None
    if need[3]:
        grad_U = (h * mask).T @ grad_out
    if need[1] or need[2]:
        grad_masked = grad_out @ U.T
        grad_h = grad_masked * mask if need[1] else None
        grad_mask = grad_masked * h if need[2] else None
        del grad_masked
    if W_delta is not None:
        if need[0] or (delta_mask is not None and need[5]):
            grad_through_delta = grad_out @ W_delta  # g W_delta [N, d_in]
            if delta_mask is not None and need[5]:
                grad_delta_mask = (grad_through_delta * x).sum(1)
            if need[0]:
                grad_x = grad_through_delta if delta_mask is None else grad_through_delta * delta_mask.unsqueeze(1)
        if need[4]:
            grad_delta = grad_out if delta_mask is None else grad_out * delta_mask.unsqueeze(1)
            grad_W_delta = grad_delta.T @ x
    if ctx.has_bias and need[6]:
        grad_bias = grad_out.sum(0)
    return grad_x, grad_h, grad_mask, grad_U, grad_W_delta, grad_delta_mask, grad_bias


def _register(ops: Kernels) -> None:
    torch.library.register_fake(ops.masked_component_forward, _fake)
    torch.library.register_autograd(ops.masked_component_forward, _backward, setup_context=_setup)


_register(NATIVE)
_register(TRITON)
