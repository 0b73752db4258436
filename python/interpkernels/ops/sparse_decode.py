"""sparse_decode and the two products its gradients are made of.

    sparse_decode            out[n]   = sum_j values[n, j] * W[indices[n, j]] + bias
    gathered_dot             out[n,j] = W[indices[n, j]] . dense[n]
    sparse_transpose_matmul  rows[i]  = sum_{(n,j): indices[n,j]=i} values[n, j] * dense[n]

The three are closed under differentiation (each one's gradients are the
other two), so every order of derivative runs on the fused kernels. The C++
schemas are in csrc/ops.cpp; kernels in csrc/cpu/sparse_decode.cpp and
csrc/cuda/.
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve

_ops = torch.ops.interpkernels


def sparse_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode a sparse code: ``out[..., :] = sum_j values[..., j] * W_dec[indices[..., j]] + bias``.

    Args:
        values: ``[..., k]`` float activations of the active latents.
        indices: ``[..., k]`` int64 (or int32) latent ids in ``[0, M)``.
        W_dec: ``[M, d]`` decoder, one row per latent.
        bias: optional ``[d]``.
        backend: which implementation runs (interpkernels._backends).

    Returns ``[..., d]`` in W_dec's dtype. Differentiable in values, W_dec and bias.
    """
    v.require_float("values", values)
    W_dec = v.require_float("W_dec", W_dec, values.device)
    if values.dim() < 1:
        raise ValueError(f"values: expected a tensor of shape [..., k], got {v.describe(values)}")
    indices = v.require_indices("indices", indices, values)
    if W_dec.dim() != 2:
        raise ValueError(f"W_dec: expected shape [M, d], got {v.describe(W_dec)}")
    if bias is not None:
        v.require_float("bias", bias, values.device)
        v.require_shape("bias", bias, (W_dec.shape[1],), f"[d] = [{W_dec.shape[1]}]")
    v.require_same_device("values", values, W_dec=W_dec, bias=bias)
    values, W_dec, bias = v.autocast_inputs(values.device, values, W_dec, bias)
    v.require_same_dtype("values", values, W_dec=W_dec, bias=bias)
    if resolve("sparse_decode", backend, values.device) == "torch":
        return reference.sparse_decode(values, indices, W_dec, bias)

    k = values.shape[-1]
    out = _ops.sparse_decode.default(values.reshape(-1, k), indices.reshape(-1, k), W_dec, bias)
    return out.view(*values.shape[:-1], W_dec.shape[1])


@torch.library.register_fake("interpkernels::sparse_decode")
def _(values, indices, W_dec, bias):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


@torch.library.register_fake("interpkernels::gathered_dot")
def _(dense, indices, W):
    return dense.new_empty(indices.shape)


@torch.library.register_fake("interpkernels::sparse_transpose_matmul")
def _(values, indices, dense, num_latents):
    return dense.new_empty(num_latents, dense.shape[1]), values.new_empty(num_latents)


def _save_tensor_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, bias = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_bias = bias is not None


def _sparse_decode_backward(ctx, grad_out):
    values, indices, W_dec = ctx.saved_tensors
    grad_values = _ops.gathered_dot.default(grad_out, indices, W_dec) if ctx.needs_input_grad[0] else None
    grad_W_dec = None
    if ctx.needs_input_grad[2]:
        grad_W_dec = _ops.sparse_transpose_matmul.default(values, indices, grad_out, W_dec.shape[0])[0]
    grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
    return grad_values, None, grad_W_dec, grad_bias


def _gathered_dot_backward(ctx, grad_out):
    dense, indices, W = ctx.saved_tensors
    grad_dense = _ops.sparse_decode.default(grad_out, indices, W, None) if ctx.needs_input_grad[0] else None
    grad_W = None
    if ctx.needs_input_grad[2]:
        grad_W = _ops.sparse_transpose_matmul.default(grad_out, indices, dense, W.shape[0])[0]
    return grad_dense, None, grad_W


def _sparse_transpose_matmul_backward(ctx, grad_rows, grad_value_sums):
    values, indices, dense = ctx.saved_tensors
    grad_values = None
    if ctx.needs_input_grad[0]:
        grad_values = _ops.gathered_dot.default(dense, indices, grad_rows) + grad_value_sums[indices]
    grad_dense = _ops.sparse_decode.default(values, indices, grad_rows, None) if ctx.needs_input_grad[2] else None
    return grad_values, None, grad_dense, None


torch.library.register_autograd(
    "interpkernels::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
)
torch.library.register_autograd(
    "interpkernels::gathered_dot", _gathered_dot_backward, setup_context=_save_tensor_inputs
)
torch.library.register_autograd(
    "interpkernels::sparse_transpose_matmul", _sparse_transpose_matmul_backward, setup_context=_save_tensor_inputs
)
