"""Triton kernels of the GPU path (docs/OPS.md): plain functions on 2-D, contiguous-or-strided,
already validated tensors; the torch ops, autograd and fake impls wrap them elsewhere.

Importing this package needs triton. `@triton.jit` reads TRITON_INTERPRET when a kernel is
decorated, so set it before the first import to run the kernels on CPU tensors.
"""

from .attribution import error_attribution, feature_edges, latent_attribution
from .component_attribution import component_attribution
from .masked_component_forward import masked_component_forward
from .sae_training import fvu, normalize_rows_, remove_parallel_component_
from .sparse_decode import gathered_dot, group_by_latent, sparse_decode, sparse_transpose_matmul
from .topk_encode import topk_encode

__all__ = [
    "component_attribution",
    "error_attribution",
    "feature_edges",
    "fvu",
    "gathered_dot",
    "group_by_latent",
    "latent_attribution",
    "masked_component_forward",
    "normalize_rows_",
    "remove_parallel_component_",
    "sparse_decode",
    "sparse_transpose_matmul",
    "topk_encode",
]
