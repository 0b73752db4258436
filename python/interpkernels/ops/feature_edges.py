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
    # The kernels land in the next commits; until then every backend runs the reference.
    v.require_indices_in_range("src_indices", src_indices, W_dec_src.shape[0])
    v.require_indices_in_range("dst_indices", dst_indices, W_enc_dst.shape[0])
    return reference.feature_edges(*args, top_k=top_k, threshold=threshold, reduce=reduce)


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
