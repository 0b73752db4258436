"""Per-step helpers of SAE training (docs/OPS.md), one pass over their operands.

    remove_parallel_component_(grad, weight)   grad[i] -= (grad[i] . w_i) w_i / ||w_i||^2
    normalize_rows_(weight)                     w_i /= ||w_i||
    fvu(reconstruction, target)                 sum ||out - y||^2 / sum ||y - mean(y)||^2

The first two run in place under no_grad, around the optimizer step (remove
before it, normalize after it, as Gao et al. train). fvu accumulates in
float64, returns float32 (float64 for float64 inputs), and is differentiable:

    d fvu / d out = 2 (out - y) / V,   d fvu / d y = -2 (out - y) / V - fvu * 2 (y - mean(y)) / V

with V the total variance. Kernels: csrc/cpu/sae_training.cpp and
interpkernels.triton_kernels.sae_training (the GPU path: "auto" on CUDA).
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, kernels


def _require_rows(name: str, tensor: object) -> torch.Tensor:
    tensor = v.require_float(name, tensor)
    if tensor.dim() != 2 or not tensor.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor of shape [M, d], got {v.describe(tensor)}")
    return tensor


@torch.no_grad()
def remove_parallel_component_(grad: torch.Tensor, weight: torch.Tensor, *, backend: str | None = None) -> None:
    """In place: drop from each row of grad its component along that row of weight."""
    _require_rows("grad", grad)
    v.require_float("weight", weight)
    v.require_shape("weight", weight, grad.shape, f"{list(grad.shape)} (the shape of grad)")
    v.require_same_device("grad", grad, weight=weight)
    v.require_same_dtype("grad", grad, weight=weight)
    backend = resolve("remove_parallel_component_", backend, grad.device)
    if backend == "torch":
        direction = weight / weight.norm(dim=-1, keepdim=True)
        grad.sub_((grad * direction).sum(-1, keepdim=True) * direction)
        return
    kernels(backend).remove_parallel_component_(grad, weight)


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, *, backend: str | None = None) -> None:
    """In place: every row of weight to unit L2 norm (zero rows stay zero)."""
    _require_rows("weight", weight)
    backend = resolve("normalize_rows_", backend, weight.device)
    if backend == "torch":
        weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny))
        return
    kernels(backend).normalize_rows_(weight)


def fvu(reconstruction: torch.Tensor, target: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Fraction of variance unexplained over all rows (leading dims flattened)."""
    v.require_float("reconstruction", reconstruction)
    v.require_float("target", target)
    v.require_shape("reconstruction", reconstruction, target.shape, f"{list(target.shape)} (the shape of target)")
    v.require_same_device("target", target, reconstruction=reconstruction)
    if target.dim() < 1:
        raise ValueError(f"target: expected a tensor of shape [..., d], got {v.describe(target)}")
    dtype = torch.promote_types(reconstruction.dtype, target.dtype)  # bf16 output vs float32 target
    reconstruction, target = reconstruction.to(dtype), target.to(dtype)
    backend = resolve("fvu", backend, target.device)
    if backend == "torch":
        return reference.fvu(reconstruction.float() if dtype != torch.float64 else reconstruction,
                             target.float() if dtype != torch.float64 else target)
    d = target.shape[-1]
    return kernels(backend).fvu(reconstruction.reshape(-1, d), target.reshape(-1, d))[0]


def _in_place_fake(*args):
    return None


def _fvu_fake(reconstruction, target):
    dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    return target.new_empty((), dtype=dtype), target.new_empty((), dtype=dtype)


def _fvu_setup(ctx, inputs, output):
    reconstruction, target = inputs
    value, total_variance = output
    ctx.save_for_backward(reconstruction, target, value, total_variance)
    ctx.mark_non_differentiable(total_variance)


def _fvu_backward(ctx, grad_fvu, _grad_total_variance):
    reconstruction, target, value, total_variance = ctx.saved_tensors
    scale = 2 * grad_fvu / total_variance
    residual = reconstruction.to(scale.dtype) - target.to(scale.dtype)
    grad_reconstruction = grad_target = None
    if ctx.needs_input_grad[0]:
        grad_reconstruction = (scale * residual).to(reconstruction.dtype)
    if ctx.needs_input_grad[1]:
        centered = target.to(scale.dtype) - target.to(scale.dtype).mean(0)
        grad_target = (-scale * (residual + value * centered)).to(target.dtype)
    return grad_reconstruction, grad_target


for _kernels in (NATIVE, TRITON):
    torch.library.register_fake(_kernels.remove_parallel_component_, _in_place_fake)
    torch.library.register_fake(_kernels.normalize_rows_, _in_place_fake)
    torch.library.register_fake(_kernels.fvu, _fvu_fake)
    torch.library.register_autograd(_kernels.fvu, _fvu_backward, setup_context=_fvu_setup)
