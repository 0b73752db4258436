"""The registered ops behind each backend, as one table per backend.

The C++ ops (csrc/ops.cpp) dispatch by device to the CPU and CUDA kernels.
The Triton kernels (interpkernels.triton_kernels) are registered here as ops
of the same schemas named ``<op>_triton``, for CUDA tensors and, under
TRITON_INTERPRET=1, CPU ones; triton is imported on first use only. Fake
implementations and autograd are registered per table by the op modules, so
a backward runs on the backend of its forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from interpkernels import _validation as v

_ops = torch.ops.interpkernels


class Kernels(NamedTuple):
    topk_encode: torch._ops.OpOverload
    sparse_decode: torch._ops.OpOverload
    gathered_dot: torch._ops.OpOverload
    sparse_transpose_matmul: torch._ops.OpOverload
    latent_grouping: torch._ops.OpOverload
    grouped_transpose_matmul: torch._ops.OpOverload
    remove_parallel_component_: torch._ops.OpOverload
    normalize_rows_: torch._ops.OpOverload
    fvu: torch._ops.OpOverload
    component_attribution: torch._ops.OpOverload
    masked_component_forward: torch._ops.OpOverload
    # attribution patching
    latent_attribution: torch._ops.OpOverload
    error_attribution: torch._ops.OpOverload
    feature_edges: torch._ops.OpOverload


_OP_NAMES = Kernels._fields


def triton_name(name: str) -> str:
    """sparse_decode -> sparse_decode_triton; in-place ops keep their trailing underscore."""
    return name.rstrip("_") + "_triton" + ("_" if name.endswith("_") else "")


def _triton_kernels():
    from interpkernels import triton_kernels

    return triton_kernels


def _check_triton_dtype(tensor: torch.Tensor) -> None:
    if tensor.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the triton backend runs float32, bfloat16 and float16, got {tensor.dtype}")


def _topk_encode_triton(x, W_enc, b_enc, k, pre_bias, latent_mask, threshold):
    _check_triton_dtype(x)
    if latent_mask is not None:
        v.require_mask_keeps(k, latent_mask)
    return _triton_kernels().topk_encode(x, W_enc, b_enc, k, pre_bias, latent_mask, threshold)


def _sparse_decode_triton(values, indices, W_dec, bias):
    _check_triton_dtype(W_dec)
    v.require_indices_in_range("indices", indices, W_dec.shape[0])
    return _triton_kernels().sparse_decode(values, indices, W_dec, bias)


def _gathered_dot_triton(dense, indices, W):
    _check_triton_dtype(W)
    v.require_indices_in_range("indices", indices, W.shape[0])
    return _triton_kernels().gathered_dot(dense, indices, W)


def _sparse_transpose_matmul_triton(values, indices, dense, num_latents):
    _check_triton_dtype(dense)
    v.require_indices_in_range("indices", indices, num_latents)
    return _triton_kernels().sparse_transpose_matmul(values, indices, dense, num_latents)


def _latent_grouping_triton(indices, num_latents):
    v.require_indices_in_range("indices", indices, num_latents)
    return torch.cat(_triton_kernels().group_by_latent(indices, num_latents))


def _grouped_transpose_matmul_triton(values, indices, dense, grouping):
    _check_triton_dtype(dense)
    num_latents = grouping.numel() - 1 - indices.numel()
    v.require_indices_in_range("indices", indices, num_latents)
    groups = (grouping[:num_latents + 1], grouping[num_latents + 1:])
    return _triton_kernels().sparse_transpose_matmul(values, indices, dense, num_latents, groups)


def _remove_parallel_component_triton(grad, weight):
    _check_triton_dtype(grad)
    _triton_kernels().remove_parallel_component_(grad, weight)


def _normalize_rows_triton(weight):
    _check_triton_dtype(weight)
    _triton_kernels().normalize_rows_(weight)


def _fvu_triton(reconstruction, target):
    _check_triton_dtype(target)
    return _triton_kernels().fvu(reconstruction, target)


def _component_attribution_triton(h, B, G):
    _check_triton_dtype(h[0])
    return _triton_kernels().component_attribution(h, B, G)


def _masked_component_forward_triton(x, h, mask, U, W_delta, delta_mask, bias):
    _check_triton_dtype(x)
    return _triton_kernels().masked_component_forward(x, h, mask, U, W_delta, delta_mask, bias)


# ---- attribution patching ----


def _latent_attribution_triton(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec):
    _check_triton_dtype(grad)
    v.require_indices_in_range("clean_indices", clean_indices, W_dec.shape[0])
    v.require_indices_in_range("patched_indices", patched_indices, W_dec.shape[0])
    return _triton_kernels().latent_attribution(clean_values, clean_indices, patched_values, patched_indices, grad,
                                                W_dec)


def _error_attribution_triton(clean_error, patched_error, grad):
    _check_triton_dtype(grad)
    return _triton_kernels().error_attribution(clean_error, patched_error, grad)


def _feature_edges_triton(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, top_k, threshold):
    _check_triton_dtype(src_values)
    v.require_indices_in_range("src_indices", src_indices, W_dec_src.shape[0])
    v.require_indices_in_range("dst_indices", dst_indices, W_enc_dst.shape[0])
    return _triton_kernels().feature_edges(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale,
                                           top_k, threshold)


_library = torch.library.Library("interpkernels", "FRAGMENT")
for _name, _impl in zip(_OP_NAMES, (_topk_encode_triton, _sparse_decode_triton, _gathered_dot_triton,
                                    _sparse_transpose_matmul_triton, _latent_grouping_triton,
                                    _grouped_transpose_matmul_triton, _remove_parallel_component_triton,
                                    _normalize_rows_triton, _fvu_triton, _component_attribution_triton,
                                    _masked_component_forward_triton,
                                    _latent_attribution_triton,
                                    _error_attribution_triton, _feature_edges_triton)):
    # Same schema as the C++ op, under the _triton name.
    _schema = str(getattr(_ops, _name).default._schema).split("(", 1)[1]
    _library.define(f"{triton_name(_name)}({_schema}")
    for _device in ("CPU", "CUDA"):
        _library.impl(triton_name(_name), _impl, _device)

NATIVE = Kernels(*(getattr(_ops, name).default for name in _OP_NAMES))
TRITON = Kernels(*(getattr(_ops, triton_name(name)).default for name in _OP_NAMES))


def kernels(backend: str) -> Kernels:
    """The table for a resolved backend ("cpu" and "cuda" share the C++ ops)."""
    return TRITON if backend == "triton" else NATIVE
