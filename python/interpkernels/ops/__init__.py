"""Typed public wrappers over torch.ops.interpkernels, one module per op.

Each module validates arguments, flattens leading dimensions, calls the
registered op, and registers that op's fake implementation and autograd.
"""

from interpkernels.ops.sparse_decode import sparse_decode
from interpkernels.ops.topk_encode import topk_encode

__all__ = ["sparse_decode", "topk_encode"]
