"""Typed public wrappers over torch.ops.interpkernels, one module per op.

Each module validates arguments, flattens leading dimensions, calls the
registered op, and registers that op's fake implementation and autograd.
"""

from interpkernels.ops.batch_topk_encode import batch_topk_encode
from interpkernels.ops.component_attribution import component_attribution
from interpkernels.ops.error_attribution import error_attribution
from interpkernels.ops.feature_edges import feature_edges
from interpkernels.ops.jumprelu_encode import jumprelu_encode
from interpkernels.ops.latent_attribution import latent_attribution
from interpkernels.ops.masked_component_forward import masked_component_forward
from interpkernels.ops.multi_target_decode import multi_target_decode
from interpkernels.ops.sparse_decode import sparse_decode
from interpkernels.ops.topk_encode import topk_encode

__all__ = [
    "batch_topk_encode",
    "component_attribution",
    "error_attribution",
    "feature_edges",
    "jumprelu_encode",
    "latent_attribution",
    "masked_component_forward",
    "multi_target_decode",
    "sparse_decode",
    "topk_encode",
]
