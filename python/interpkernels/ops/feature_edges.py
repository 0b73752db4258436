"""feature_edges: attribution edges between SAE latents of two sites through
the residual stream (virtual weights), pruned per destination.

    E[n, i, j] = dst_scale[n, i] * (W_enc_dst[dst_indices[n, i]] . W_dec_src[src_indices[n, j]])
                 * src_values[n, j]

A gather-gather product, 2 * N * k_dst * k_src * d FLOPs. Per destination
(n, i) the top_k largest |E| (ties: lower j; NaN ranks as +inf) are kept, of
those the ones with |E| >= threshold. The kernels prune each token's
k_dst x k_src block where they compute it and write only the kept slots.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels

REDUCTIONS = ("none", "sum")


def feature_edges(
    src_values: torch.Tensor,
    src_indices: torch.Tensor,
    W_dec_src: torch.Tensor,
    dst_indices: torch.Tensor,
    W_enc_dst: torch.Tensor,
    dst_scale: torch.Tensor,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    reduce: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """Per-token latent-to-latent edges, pruned per destination latent.

    Args:
        src_values, src_indices: the source site's sparse code ``[..., k_src]``.
        W_dec_src: ``[M_src, d]`` the source SAE's decoder.
        dst_indices: ``[..., k_dst]`` the destination site's active latents.
        W_enc_dst: ``[M_dst, d]`` the destination SAE's encoder.
        dst_scale: ``[..., k_dst]`` per destination entry, aligned with
            dst_indices: the metric gradient w.r.t. that latent (EAP edges),
            or 1 for plain virtual-weight edges.
        top_k: keep at most this many sources per destination (>= 1).
        threshold: keep only edges with ``|E| >= threshold``.
        reduce: ``"none"``: a coalesced sparse COO ``[..., M_dst, M_src]`` of the
            kept edges of every token; ``"sum"``: the kept edges summed over
            tokens, a coalesced sparse COO ``[M_dst, M_src]``.
        backend: which implementation runs (interpkernels._backends).

    Returns float32 values (float64 for float64 inputs). The padded per-token
    form is the op ``torch.ops.interpkernels.feature_edges`` (docs/OPS.md).
    """
    args = _validate(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, top_k, threshold, reduce)
    src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale = args
    backend = resolve("feature_edges", backend, src_values.device)
    if backend == "torch":
        v.require_indices_in_range("src_indices", src_indices, W_dec_src.shape[0])
        v.require_indices_in_range("dst_indices", dst_indices, W_enc_dst.shape[0])
        return reference.feature_edges(*args, top_k=top_k, threshold=threshold, reduce=reduce)

    # Row counts spelled out: reshape(0, -1) cannot infer a width.
    N = math.prod(src_values.shape[:-1])
    flat_src_values, flat_src_indices, flat_dst_indices, flat_dst_scale = (t.reshape(N, t.shape[-1]) for t in (
        src_values, src_indices, dst_indices, dst_scale))
    values, src_slots = kernels(backend).feature_edges(flat_src_values, flat_src_indices, W_dec_src, flat_dst_indices,
                                                       W_enc_dst, flat_dst_scale, top_k, threshold)
    return reference.sparse_edges(values, src_slots, src_indices, dst_indices,
                                  (W_enc_dst.shape[0], W_dec_src.shape[0]), reduce)


def _validate(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, top_k, threshold, reduce):
    if not isinstance(reduce, str) or reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduce!r}")
    src_values = v.require_float("src_values", src_values)
    if src_values.dim() < 1:
        raise ValueError(f"src_values: expected a tensor of shape [..., k_src], got {v.describe(src_values)}")
    device, leading = src_values.device, tuple(src_values.shape[:-1])
    src_indices = v.require_indices("src_indices", src_indices, src_values)
    dst_scale = v.require_float("dst_scale", dst_scale, device)
    if dst_scale.dim() < 1 or tuple(dst_scale.shape[:-1]) != leading:
        raise ValueError(f"dst_scale: expected shape [..., k_dst] with leading dims {list(leading)} (those of "
                         f"src_values), got {v.describe(dst_scale)}")
    dst_indices = v.require_indices("dst_indices", dst_indices, dst_scale)
    W_dec_src = v.require_float("W_dec_src", W_dec_src, device)
    W_enc_dst = v.require_float("W_enc_dst", W_enc_dst, device)
    if W_dec_src.dim() != 2:
        raise ValueError(f"W_dec_src: expected shape [M_src, d], got {v.describe(W_dec_src)}")
    if W_enc_dst.dim() != 2 or W_enc_dst.shape[1] != W_dec_src.shape[1]:
        raise ValueError(f"W_enc_dst: expected shape [M_dst, d] with d = {W_dec_src.shape[1]} (the width of "
                         f"W_dec_src), got {v.describe(W_enc_dst)}")
    if top_k is not None:
        v.require_count("top_k", top_k, 1, 2**62, "2^62")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise TypeError(f"threshold: expected a float (not NaN) or None, got {threshold!r}")
        threshold = float(threshold)
    v.require_same_device("src_values", src_values, W_dec_src=W_dec_src, W_enc_dst=W_enc_dst, dst_scale=dst_scale)
    src_values, W_dec_src, W_enc_dst, dst_scale = v.autocast_inputs(device, src_values, W_dec_src, W_enc_dst,
                                                                    dst_scale)
    v.require_same_dtype("src_values", src_values, W_dec_src=W_dec_src, W_enc_dst=W_enc_dst, dst_scale=dst_scale)
    return src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale


def _feature_edges_fake(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, top_k, threshold):
    k_src = src_indices.shape[1]
    shape = (src_values.shape[0], dst_indices.shape[1], k_src if top_k is None else min(top_k, k_src))
    values = src_values.new_empty(shape, dtype=reference.attribution_dtype(src_values.dtype))
    return values, src_indices.new_empty(shape)


def _feature_edges_setup(ctx, inputs, output):
    src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, _, _ = inputs
    ctx.save_for_backward(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, output[1])


def _feature_edges_backward(ctx, grad_values, _grad_slots):
    """Gradients of the kept edges; which edges are kept is piecewise constant.

    With S [N, k_dst, k_src] the values' gradient scattered back to the slots
    (0 where pruned), V the virtual weights, s = dst_scale, a = src_values:
    dE/ds = V a, dE/da = s V, dE/dV = s a, and V's gradient reaches the gathered
    encoder / decoder rows as a batched product. Dense per token: O(N k d)
    memory, as much as the forward's inputs gathered once.
    """
    src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, src_slots = ctx.saved_tensors
    dtype = grad_values.dtype
    kept = src_slots >= 0
    S = grad_values.new_zeros(*dst_scale.shape, src_values.shape[1]).scatter_add(
        2, src_slots.clamp_min(0), torch.where(kept, grad_values, 0))
    src_rows, dst_rows = W_dec_src[src_indices].to(dtype), W_enc_dst[dst_indices].to(dtype)
    V = dst_rows @ src_rows.transpose(1, 2)
    s, a = dst_scale.to(dtype).unsqueeze(2), src_values.to(dtype).unsqueeze(1)
    needs = ctx.needs_input_grad
    grad_src_values = (S * s * V).sum(1).to(src_values.dtype) if needs[0] else None
    grad_dst_scale = (S * V * a).sum(2).to(dst_scale.dtype) if needs[5] else None
    grad_W_dec_src = grad_W_enc_dst = None
    if needs[2] or needs[4]:
        grad_V = S * s * a
        if needs[2]:
            rows = (grad_V.transpose(1, 2) @ dst_rows).flatten(0, 1)
            grad_W_dec_src = torch.zeros_like(W_dec_src, dtype=dtype).index_add(0, src_indices.flatten(), rows)
            grad_W_dec_src = grad_W_dec_src.to(W_dec_src.dtype)
        if needs[4]:
            rows = (grad_V @ src_rows).flatten(0, 1)
            grad_W_enc_dst = torch.zeros_like(W_enc_dst, dtype=dtype).index_add(0, dst_indices.flatten(), rows)
            grad_W_enc_dst = grad_W_enc_dst.to(W_enc_dst.dtype)
    return grad_src_values, None, grad_W_dec_src, None, grad_W_enc_dst, grad_dst_scale, None, None


def _register(ops: Kernels) -> None:
    torch.library.register_fake(ops.feature_edges, _feature_edges_fake)
    torch.library.register_autograd(ops.feature_edges, _feature_edges_backward, setup_context=_feature_edges_setup)


_register(NATIVE)
_register(TRITON)
