"""error_attribution: the attribution patching (AtP) score of an SAE's error node.

    attr[n] = (eps_p - eps_c)[n] . grad[n]

eps = x - x_hat, the part of the activation the dictionary does not explain.
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve


def error_attribution(
    clean_error: torch.Tensor,
    patched_error: torch.Tensor,
    grad: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Row-wise ``((patched_error - clean_error) * grad).sum(-1)``.

    Args:
        clean_error, patched_error: ``[..., d]`` SAE errors of the two runs.
        grad: ``[..., d]`` metric gradient at the SAE site (clean run).
        backend: which implementation runs (interpkernels._backends).

    Returns ``[...]`` float32 (float64 for float64 inputs); differentiable in all three.
    """
    grad = v.require_float("grad", grad)
    if grad.dim() < 1:
        raise ValueError(f"grad: expected a tensor of shape [..., d], got {v.describe(grad)}")
    shape_text = f"{list(grad.shape)} (the shape of grad)"
    for name, error in (("clean_error", clean_error), ("patched_error", patched_error)):
        v.require_float(name, error, grad.device)
        v.require_shape(name, error, grad.shape, shape_text)
    v.require_same_device("grad", grad, clean_error=clean_error, patched_error=patched_error)
    clean_error, patched_error, grad = v.autocast_inputs(grad.device, clean_error, patched_error, grad)
    v.require_same_dtype("grad", grad, clean_error=clean_error, patched_error=patched_error)
    backend = resolve("error_attribution", backend, grad.device)
    # The kernels land in the next commits; until then every backend runs the reference.
    return reference.error_attribution(clean_error, patched_error, grad)
