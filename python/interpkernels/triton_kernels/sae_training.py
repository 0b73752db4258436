"""Triton kernels for the per-step helpers of SAE training (docs/OPS.md).

    remove_parallel_component_  grad[i] -= (grad[i] . w_i) w_i / ||w_i||^2   (in place)
    normalize_rows_             w_i /= ||w_i||                               (in place)
    fvu                         (sum ||out - y||^2 / V, V = sum ||y - mean(y)||^2)

Row kernels: one program per row, two sweeps over it (a reduction, then the
update), float32 arithmetic. FVU: each program sums one (row block, column
tile) in float64 (y, y^2 and the squared error per column), and the column
partials combine on the host side of the op: V = sum_c (sum y^2 - (sum y)^2 / N).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _remove_parallel_kernel(grad_ptr, weight_ptr, width, BLOCK: tl.constexpr):
    """grad[i] -= (grad[i] . w_i / ||w_i||^2) w_i for row i = program 0 (zero rows untouched)."""
    row = tl.program_id(0).to(tl.int64) * width
    dot = tl.zeros([BLOCK], tl.float32)
    norm_squared = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < width
        w = tl.load(weight_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        dot += g * w
        norm_squared += w * w
    total = tl.sum(norm_squared, axis=0)
    coefficient = tl.where(total > 0, tl.sum(dot, axis=0) / tl.where(total > 0, total, 1.0), 0.0)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < width
        w = tl.load(weight_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(grad_ptr + row + cols, (g - coefficient * w).to(grad_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _normalize_rows_kernel(weight_ptr, width, BLOCK: tl.constexpr):
    """w_i /= ||w_i|| for row i = program 0 (zero rows stay zero)."""
    row = tl.program_id(0).to(tl.int64) * width
    norm_squared = tl.zeros([BLOCK], tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        w = tl.load(weight_ptr + row + cols, mask=cols < width, other=0.0).to(tl.float32)
        norm_squared += w * w
    total = tl.sum(norm_squared, axis=0)
    scale = tl.where(total > 0, 1.0 / tl.sqrt(tl.where(total > 0, total, 1.0)), 1.0)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < width
        w = tl.load(weight_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(weight_ptr + row + cols, (w * scale).to(weight_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fvu_partials_kernel(out_ptr, target_ptr, partials_ptr, rows, width, rows_per_program,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """partials[p, :, c] = (sum y, sum y^2, sum (out - y)^2) over the rows of
    program p = program 0, for the columns c of tile program 1, in float64."""
    program = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < width
    y_sum = tl.zeros([BLOCK_D], tl.float64)
    y_square_sum = tl.zeros([BLOCK_D], tl.float64)
    error_sum = tl.zeros([BLOCK_D], tl.float64)
    first = program.to(tl.int64) * rows_per_program
    for start in range(0, rows_per_program, BLOCK_N):
        n = first + start + tl.arange(0, BLOCK_N)
        ok = (n < rows)[:, None] & col_ok[None, :]
        offsets = n[:, None] * width + cols[None, :]
        y = tl.load(target_ptr + offsets, mask=ok, other=0.0).to(tl.float64)
        residual = tl.load(out_ptr + offsets, mask=ok, other=0.0).to(tl.float64) - y
        y_sum += tl.sum(y, axis=0)
        y_square_sum += tl.sum(y * y, axis=0)
        error_sum += tl.sum(residual * residual, axis=0)
    base = partials_ptr + program.to(tl.int64) * 3 * width + cols
    tl.store(base, y_sum, mask=col_ok)
    tl.store(base + width, y_square_sum, mask=col_ok)
    tl.store(base + 2 * width, error_sum, mask=col_ok)


def _row_block(width: int) -> int:
    return min(1024, triton.next_power_of_2(max(width, 1)))


def remove_parallel_component_(grad: torch.Tensor, weight: torch.Tensor) -> None:
    """In place on contiguous [M, d] grad, given weight of the same shape and dtype."""
    if grad.numel():
        _remove_parallel_kernel[(grad.shape[0],)](grad, weight.contiguous(), grad.shape[1],
                                                   BLOCK=_row_block(grad.shape[1]))


def normalize_rows_(weight: torch.Tensor) -> None:
    """In place on a contiguous [M, d] weight."""
    if weight.numel():
        _normalize_rows_kernel[(weight.shape[0],)](weight, weight.shape[1], BLOCK=_row_block(weight.shape[1]))


def fvu(reconstruction: torch.Tensor, target: torch.Tensor, *, block_n: int = 16, block_d: int | None = None,
        programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(fvu, total variance) of [N, d] tensors as 0-d float32 (float64 for float64 inputs)."""
    rows, width = target.shape
    reconstruction, target = reconstruction.contiguous(), target.contiguous()
    block_d = block_d or min(128, triton.next_power_of_2(max(width, 1)))
    programs = programs or max(1, min(triton.cdiv(rows, block_n), 4 * 132 // triton.cdiv(width, block_d) + 1))
    rows_per_program = triton.cdiv(triton.cdiv(rows, programs), block_n) * block_n
    programs = max(1, triton.cdiv(rows, rows_per_program))
    partials = torch.zeros(programs, 3, width, dtype=torch.float64, device=target.device)
    if rows and width:
        _fvu_partials_kernel[(programs, triton.cdiv(width, block_d))](
            reconstruction, target, partials, rows, width, rows_per_program, BLOCK_N=block_n, BLOCK_D=block_d)
    y_sum, y_square_sum, error_sum = partials.sum(0)
    total_variance = (y_square_sum - y_sum * y_sum / rows).sum()
    dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    return (error_sum.sum() / total_variance).to(dtype), total_variance.to(dtype)
