"""sparse_decode and the two products its gradients are made of.

    sparse_decode            out[n]   = sum_j values[n, j] * W[indices[n, j]] + bias
    gathered_dot             out[n,j] = W[indices[n, j]] . dense[n]
    sparse_transpose_matmul  rows[i]  = sum_{(n,j): indices[n,j]=i} values[n, j] * dense[n]

The three are closed under differentiation (each one's gradients are the
other two), so every order of derivative runs on the fused kernels, of the
backend the forward ran on.

sparse_transpose_matmul first groups the code's entries by latent. The
backward passes build that grouping once per code (latent_grouping) and
share it (grouped_transpose_matmul): the decoder's and the encoder's weight
gradients of one SAE step read the same code (shared_grouping). The C++ schemas are in csrc/ops.cpp; kernels in
csrc/cpu/sparse_decode.cpp, csrc/cuda/ and interpkernels.triton_kernels.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels


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
        indices: ``[..., k]`` int64 (or int32) latent ids in ``[0, M)``; k = 0 is
            the empty code (the output is the bias, or zeros).
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
    backend = resolve("sparse_decode", backend, values.device)
    if backend == "torch":
        v.require_indices_in_range("indices", indices, W_dec.shape[0])
        return reference.sparse_decode(values, indices, W_dec, bias)

    # The row count is spelled out: reshape(-1, 0) cannot infer it for an empty code (k = 0).
    flat_shape = (math.prod(values.shape[:-1]), values.shape[-1])
    out = kernels(backend).sparse_decode(values.reshape(flat_shape), indices.reshape(flat_shape), W_dec, bias)
    return out.view(*values.shape[:-1], W_dec.shape[1])


def _sparse_decode_fake(values, indices, W_dec, bias):
    return W_dec.new_empty(values.shape[0], W_dec.shape[1])


def _gathered_dot_fake(dense, indices, W):
    return dense.new_empty(indices.shape)


def _sparse_transpose_matmul_fake(values, indices, dense, num_latents):
    return dense.new_empty(num_latents, dense.shape[1]), values.new_empty(num_latents)


def _latent_grouping_fake(indices, num_latents):
    return indices.new_empty(num_latents + 1 + indices.numel())


def _grouped_transpose_matmul_fake(values, indices, dense, grouping):
    num_latents = grouping.shape[0] - 1 - values.numel()
    return dense.new_empty(num_latents, dense.shape[1]), values.new_empty(num_latents)


def shared_grouping(ops: Kernels, indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    """ops.latent_grouping(indices, num_latents), built once per code.

    Kept on the tensor that owns the code's memory (``indices._base``, or
    indices itself: the views the public wrappers make of one kernel output
    share it), keyed by the view's layout, num_latents and the version
    counter, so an in-place change of the code invalidates it. It lives as
    long as that tensor (the autograd graph's saved code). Not while a graph
    is traced (torch.compile, AOT dispatch: fake or functional tensors),
    whose backward is one graph anyway."""
    if torch.compiler.is_compiling() or type(indices) is not torch.Tensor:
        return ops.latent_grouping(indices, num_latents)
    owner = indices if indices._base is None else indices._base
    key = (num_latents, indices._version, tuple(indices.shape), indices.stride(), indices.storage_offset())
    cache = owner.__dict__.setdefault("_interpkernels_groupings", {})
    if key not in cache:
        cache.clear()  # one code, one grouping: an older version is stale
        cache[key] = ops.latent_grouping(indices, num_latents)
    return cache[key]


def weight_gradient(ops: Kernels, values: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor,
                    num_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.sparse_transpose_matmul(values, indices, dense, num_latents) on the code's shared grouping."""
    return ops.grouped_transpose_matmul(values, indices, dense, shared_grouping(ops, indices, num_latents))


def _save_tensor_inputs(ctx, inputs, output):
    ctx.save_for_backward(*(t for t in inputs if isinstance(t, torch.Tensor)))


def _sparse_decode_setup(ctx, inputs, output):
    values, indices, W_dec, bias = inputs
    ctx.save_for_backward(values, indices, W_dec)
    ctx.has_bias = bias is not None


def _register(ops: Kernels) -> None:
    """Fake implementations and autograd of one backend's three products."""

    def sparse_decode_backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = ops.gathered_dot(grad_out, indices, W_dec) if ctx.needs_input_grad[0] else None
        grad_W_dec = None
        if ctx.needs_input_grad[2]:
            grad_W_dec = weight_gradient(ops, values, indices, grad_out, W_dec.shape[0])[0]
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_values, None, grad_W_dec, grad_bias

    def gathered_dot_backward(ctx, grad_out):
        dense, indices, W = ctx.saved_tensors
        grad_dense = ops.sparse_decode(grad_out, indices, W, None) if ctx.needs_input_grad[0] else None
        grad_W = weight_gradient(ops, grad_out, indices, dense, W.shape[0])[0] if ctx.needs_input_grad[2] else None
        return grad_dense, None, grad_W

    def sparse_transpose_matmul_backward(ctx, grad_rows, grad_value_sums):
        """Of sparse_transpose_matmul and of grouped_transpose_matmul (whose grouping is saved fourth)."""
        values, indices, dense = ctx.saved_tensors[:3]
        grad_values = None
        if ctx.needs_input_grad[0]:
            grad_values = ops.gathered_dot(dense, indices, grad_rows) + grad_value_sums[indices]
        grad_dense = ops.sparse_decode(values, indices, grad_rows, None) if ctx.needs_input_grad[2] else None
        return grad_values, None, grad_dense, None

    for op, fake, backward, setup in (
        (ops.sparse_decode, _sparse_decode_fake, sparse_decode_backward, _sparse_decode_setup),
        (ops.gathered_dot, _gathered_dot_fake, gathered_dot_backward, _save_tensor_inputs),
        (ops.sparse_transpose_matmul, _sparse_transpose_matmul_fake, sparse_transpose_matmul_backward,
         _save_tensor_inputs),
        (ops.grouped_transpose_matmul, _grouped_transpose_matmul_fake, sparse_transpose_matmul_backward,
         _save_tensor_inputs),
    ):
        torch.library.register_fake(op, fake)
        torch.library.register_autograd(op, backward, setup_context=setup)
    torch.library.register_fake(ops.latent_grouping, _latent_grouping_fake)  # integer output: no gradient


_register(NATIVE)
_register(TRITON)
