"""component_attribution: APD's attribution of each token's output to each parameter component.

    rank 1  (h [..., C],    U [C, d]):    A[n, c] = sum_o (h[n,c] * (U[c] . G[n,o]))^2
    rank m  (h [..., C, m], B [C, m, d]): A[n, c] = sum_o (sum_r h[n,c,r] * (B[c,r] . G[n,o]))^2

G [..., O, d] holds, per token, the rows of the Jacobian of O outputs with
respect to the layer's output y (G[n, o] = d f_o / d y[n]); interpkernels.
decomposition.output_jacobian_rows gets them with one batched backward. The
kernels (csrc/cpu/component_attribution.cpp, triton_kernels/) never store
[N, O, C]. The C++ schema is in csrc/ops.cpp.

The backward, with s[n,o,c] = sum_r h[n,c,r] P[n,o,c,r], P[n,o,c,r] = B[c,r] . G[n,o]
and g = grad_out:
    grad_h[n,c,r] = 2 g[n,c] sum_o s[n,o,c] P[n,o,c,r]
    grad_B[c,r]   = 2 sum_{n,o} g[n,c] h[n,c,r] s[n,o,c] G[n,o]
    grad_G[n,o]   = 2 sum_{c,r} g[n,c] s[n,o,c] h[n,c,r] B[c,r]
It is written in torch ops over blocks of tokens, so that [N, O, C, m] is only
held a block at a time; being torch ops, it is itself differentiable.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels

# Entries of [tokens, O, C, m] the backward holds at once (16 MiB of float32).
_BACKWARD_BLOCK_ENTRIES = 1 << 22


def component_attribution(
    h: torch.Tensor, U: torch.Tensor, G: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """APD attributions ``[..., C]`` of components to the O outputs whose Jacobian rows G holds.

    Args:
        h: component activations, ``[..., C]`` (rank 1) or ``[..., C, m]`` (rank m).
        U: components, ``[C, d]`` (rank 1: the output directions U[c]) or ``[C, m, d]`` (rank m: B).
        G: ``[..., O, d]`` output-Jacobian rows at the layer, same leading shape as h.
        backend: which implementation runs (interpkernels._backends).

    Returns ``[..., C]`` in h's dtype, differentiable in h, U and G. This is
    APD's ``calc_grad_attributions`` (which omits the square root and the 1/O;
    rankings are unchanged).
    """
    v.require_float("h", h)
    v.require_float("U", U, h.device)
    v.require_float("G", G, h.device)
    if U.dim() not in (2, 3):
        raise ValueError(f"U: expected shape [C, d] (rank 1) or [C, m, d] (rank m), got {v.describe(U)}")
    C, d = U.shape[0], U.shape[-1]
    component_shape = (C,) if U.dim() == 2 else (C, U.shape[1])
    component_text = f"[..., C] = [..., {C}]" if U.dim() == 2 else f"[..., C, m] = [..., {C}, {U.shape[1]}]"
    if h.dim() < len(component_shape) + 1 or tuple(h.shape[h.dim() - len(component_shape):]) != component_shape:
        raise ValueError(f"h: expected shape {component_text} (from U), got {v.describe(h)}")
    leading = h.shape[: h.dim() - len(component_shape)]
    if G.dim() != len(leading) + 2 or G.shape[:-2] != leading or G.shape[-1] != d:
        raise ValueError(f"G: expected shape [..., O, d] = [{', '.join(map(str, leading))}, O, {d}] "
                         f"(leading dims of h, d of U), got {v.describe(G)}")
    v.require_same_device("h", h, U=U, G=G)
    h, U, G = v.autocast_inputs(h.device, h, U, G)
    v.require_same_dtype("h", h, U=U, G=G)
    backend = resolve("component_attribution", backend, h.device)
    if backend == "torch":
        return reference.component_attribution(h, U, G)

    N = math.prod(leading)
    B = U.unsqueeze(1) if U.dim() == 2 else U
    out = kernels(backend).component_attribution(
        h.reshape(N, C, B.shape[1]), B, G.reshape(N, G.shape[-2], d))
    return out.view(*leading, C)


def _component_attribution_fake(h, B, G):
    return h.new_empty(h.shape[0], h.shape[1])


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def component_attribution_backward(ctx, grad_out):
    """The module docstring's gradients, a block of tokens at a time, in float32 (float64 for float64)."""
    h, B, G = ctx.saved_tensors
    N, C, m = h.shape
    O, d = G.shape[1], G.shape[2]
    need_h, need_B, need_G = ctx.needs_input_grad
    compute_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    B_rows = B.to(compute_dtype).reshape(C * m, d)
    block = max(1, _BACKWARD_BLOCK_ENTRIES // max(1, O * C * m))
    grad_h_blocks, grad_G_blocks = [], []
    grad_B_rows = torch.zeros_like(B_rows) if need_B else None
    for start in range(0, N, block):
        h_block = h[start:start + block].to(compute_dtype)
        G_block = G[start:start + block].to(compute_dtype)
        tokens = h_block.shape[0]
        projections = (G_block @ B_rows.T).view(tokens, O, C, m)
        weighted_sum = (projections * h_block.unsqueeze(1)).sum(-1)  # s [tokens, O, C]
        grad_s = 2 * weighted_sum * grad_out[start:start + block].to(compute_dtype).unsqueeze(1)
        if need_h:
            grad_h_blocks.append((grad_s.unsqueeze(-1) * projections).sum(1))
        if need_B or need_G:
            grad_projections = (grad_s.unsqueeze(-1) * h_block.unsqueeze(1)).reshape(tokens, O, C * m)
            if need_B:
                grad_B_rows = grad_B_rows + grad_projections.reshape(tokens * O, C * m).T @ G_block.reshape(-1, d)
            if need_G:
                grad_G_blocks.append(grad_projections @ B_rows)
    grad_h = torch.cat(grad_h_blocks).to(h.dtype) if need_h and N else (torch.zeros_like(h) if need_h else None)
    grad_B = grad_B_rows.view(C, m, d).to(B.dtype) if need_B else None
    grad_G = torch.cat(grad_G_blocks).to(G.dtype) if need_G and N else (torch.zeros_like(G) if need_G else None)
    return grad_h, grad_B, grad_G


def _register(ops: Kernels) -> None:
    torch.library.register_fake(ops.component_attribution, _component_attribution_fake)
    torch.library.register_autograd(ops.component_attribution, component_attribution_backward, setup_context=_setup)


_register(NATIVE)
_register(TRITON)
