"""Per-step helpers of SAE training (SPEC.md §3), one pass over their operands.

    remove_parallel_component_(grad, weight)   grad[i] -= (grad[i] . w_i) w_i / ||w_i||^2
    normalize_rows_(weight)                     w_i /= ||w_i||
    fvu(reconstruction, target)                 sum ||out - y||^2 / sum ||y - mean(y)||^2

The first two run in place under no_grad, around the optimizer step (remove
before it, normalize after it, as Gao et al. train). fvu accumulates in
float64, returns float32 (float64 for float64 inputs), and is differentiable:

    d fvu / d out = 2 (out - y) / V,   d fvu / d y = -2 (out - y) / V - fvu * 2 (y - mean(y)) / V

with V the total variance. Kernels: csrc/cpu/sae_training.cpp. There is no
GPU kernel yet: on CUDA ("auto" or "triton") and with backend="torch" the
same math runs as torch ops.
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve

_ops = torch.ops.interpkernels


def _runs_torch_math(op: str, backend: str | None, device: torch.device) -> bool:
    return resolve(op, backend, device) in ("torch", "triton")


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
    if _runs_torch_math("remove_parallel_component_", backend, grad.device):
        direction = weight / weight.norm(dim=-1, keepdim=True)
        grad.sub_((grad * direction).sum(-1, keepdim=True) * direction)
        return
    _ops.remove_parallel_component_.default(grad, weight)


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor, *, backend: str | None = None) -> None:
    """In place: every row of weight to unit L2 norm (zero rows stay zero)."""
    _require_rows("weight", weight)
    if _runs_torch_math("normalize_rows_", backend, weight.device):
        weight.div_(weight.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny))
        return
    _ops.normalize_rows_.default(weight)


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
    if _runs_torch_math("fvu", backend, target.device):
        return reference.fvu(reconstruction.float() if dtype != torch.float64 else reconstruction,
                             target.float() if dtype != torch.float64 else target)
    d = target.shape[-1]
    return _ops.fvu.default(reconstruction.reshape(-1, d), target.reshape(-1, d))[0]


@torch.library.register_fake("interpkernels::remove_parallel_component_")
def _(grad, weight):
    return None


@torch.library.register_fake("interpkernels::normalize_rows_")
def _(weight):
    return None


@torch.library.register_fake("interpkernels::fvu")
def _(reconstruction, target):
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


torch.library.register_autograd("interpkernels::fvu", _fvu_backward, setup_context=_fvu_setup)
