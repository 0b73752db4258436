"""topk_encode: the TopK SAE encoder without the [N, M] pre-activation matrix.

    pre[n, i]   = (x[n] - pre_bias) . W_enc[i] + b_enc[i]
    indices[n]  = the k highest-ranked latents of row n
    values[n,j] = relu(pre[n, indices[n, j]])   (NaN stays NaN)

The rank, on every backend: NaN first (torch.topk's rule, so a diverged model
shows NaN codes rather than hiding them); then, given `threshold`, latents
with pre > threshold[i] before the rest (JumpReLU's candidates); then larger
pre first; then the lower latent index.

Backward, with g = grad_values * (values > 0):
    grad_x[n]     = sum_j g[n, j] W_enc[indices[n, j]]        (sparse_decode on W_enc)
    grad_W_enc[i] = sum_{indices[n,j]=i} g[n, j] (x[n] - pre_bias)  (sparse_transpose_matmul)
    grad_b_enc[i] = sum_{indices[n,j]=i} g[n, j]                (its value sums)
    grad_pre_bias = -sum_n grad_x[n]

The C++ schema is in csrc/ops.cpp; the CPU kernel in csrc/cpu/topk_encode.cpp.
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels
from interpkernels.ops.sparse_decode import weight_gradient


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    pre_bias: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k sparse code of ``relu((x - pre_bias) @ W_enc.T + b_enc)``.

    Args:
        x: ``[..., d]`` activations.
        W_enc: ``[M, d]`` encoder (``nn.Linear.weight`` layout).
        b_enc: ``[M]`` encoder bias.
        k: latents kept per row, ``1 <= k <= M`` (and at most the latents
            ``latent_mask`` keeps in).
        pre_bias: optional ``[d]`` subtracted from x first (the SAE's b_dec).
        latent_mask: optional ``[M]`` bool; only True latents compete (AuxK on
            dead latents is this op with the dead mask).
        threshold: optional ``[M]``; latents with ``pre > threshold`` rank
            before all others (JumpReLU: slots a row cannot fill with them get
            its best latents at or below threshold). Not differentiated.
        backend: which implementation runs (interpkernels._backends).

    Returns ``(values [..., k] in x's dtype, indices [..., k] int64)``, each row
    in rank order (module docstring). Differentiable in x, W_enc, b_enc and
    pre_bias.
    """
    v.require_float("x", x)
    W_enc = v.require_float("W_enc", W_enc, x.device)
    b_enc = v.require_float("b_enc", b_enc, x.device)
    if x.dim() < 1:
        raise ValueError(f"x: expected a tensor of shape [..., d], got {v.describe(x)}")
    d = x.shape[-1]
    if W_enc.dim() != 2 or W_enc.shape[1] != d:
        raise ValueError(f"W_enc: expected shape [M, d] with d = {d} (the width of x), got {v.describe(W_enc)}")
    M = W_enc.shape[0]
    v.require_shape("b_enc", b_enc, (M,), f"[M] = [{M}]")
    if pre_bias is not None:
        v.require_float("pre_bias", pre_bias, x.device)
        v.require_shape("pre_bias", pre_bias, (d,), f"[d] = [{d}]")
    if latent_mask is not None:
        v.require_tensor("latent_mask", latent_mask)
        if latent_mask.dtype != torch.bool:
            raise TypeError(f"latent_mask: expected a bool tensor of shape [{M}], got {v.describe(latent_mask)}")
        v.require_shape("latent_mask", latent_mask, (M,), f"[M] = [{M}]")
    if threshold is not None:
        v.require_float("threshold", threshold, x.device)
        v.require_shape("threshold", threshold, (M,), f"[M] = [{M}]")
    k = v.require_count("k", k, 1, M, "M")
    v.require_same_device("x", x, W_enc=W_enc, b_enc=b_enc, pre_bias=pre_bias, latent_mask=latent_mask,
                          threshold=threshold)
    x, W_enc, b_enc, pre_bias = v.autocast_inputs(x.device, x, W_enc, b_enc, pre_bias)
    v.require_same_dtype("x", x, W_enc=W_enc, b_enc=b_enc, pre_bias=pre_bias)
    backend = resolve("topk_encode", backend, x.device, k=k)
    if backend == "torch":
        return reference.topk_encode(x, W_enc, b_enc, k, pre_bias=pre_bias, latent_mask=latent_mask,
                                     threshold=threshold)

    rows = x.shape[:-1].numel()  # not reshape(-1, d), which is ambiguous for d = 0
    values, indices = kernels(backend).topk_encode(x.reshape(rows, d), W_enc, b_enc, k, pre_bias, latent_mask,
                                                   threshold)
    leading = x.shape[:-1]
    return values.view(*leading, k), indices.view(*leading, k)


def _fake(x, W_enc, b_enc, k, pre_bias, latent_mask, threshold):
    shape = (x.shape[0], k)
    return x.new_empty(shape), x.new_empty(shape, dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    x, W_enc, _b_enc, _k, pre_bias, _latent_mask, _threshold = inputs
    values, indices = output
    ctx.save_for_backward(x, W_enc, pre_bias, values, indices)
    ctx.mark_non_differentiable(indices)


def _register(ops: Kernels) -> None:
    """Fake implementation and autograd of one backend's encoder; the backward
    runs on that backend's sparse products."""

    def backward(ctx, grad_values, _grad_indices):
        x, W_enc, pre_bias, values, indices = ctx.saved_tensors
        needs_x, needs_W, needs_b, _, needs_pre_bias, _, _ = ctx.needs_input_grad
        active_grad = torch.where(values > 0, grad_values, torch.zeros_like(grad_values))

        grad_x = grad_W_enc = grad_b_enc = grad_pre_bias = None
        if needs_x or needs_pre_bias:
            grad_x = ops.sparse_decode(active_grad, indices, W_enc, None)
            if needs_pre_bias:
                grad_pre_bias = -grad_x.sum(0)
        if needs_W or needs_b:
            centered = x if pre_bias is None else x - pre_bias
            grad_W_enc, grad_b_enc = weight_gradient(ops, active_grad, indices, centered, W_enc.shape[0])
        return (
            grad_x if needs_x else None,
            grad_W_enc if needs_W else None,
            grad_b_enc if needs_b else None,
            None,
            grad_pre_bias,
            None,
            None,
        )

    torch.library.register_fake(ops.topk_encode, _fake)
    torch.library.register_autograd(ops.topk_encode, backward, setup_context=_setup_context)


_register(NATIVE)
_register(TRITON)
