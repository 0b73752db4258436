"""Triton kernels for sparse decoding and the two products its gradients are made of.

    sparse_decode            out[n]        = sum_j values[n, j] * W[indices[n, j]] + bias
    gathered_dot             out[n, j]     = W[indices[n, j]] . dense[n]
    sparse_transpose_matmul  rows[i]       = sum_{(n,j): indices[n,j]=i} values[n, j] * dense[n]
                             value_sums[i] = sum_{(n,j): indices[n,j]=i} values[n, j]

All accumulate in float32 and store in the input dtype. The transpose product
reduces each latent's entries in one program, in the fixed order of
`group_by_latent`, so it is bitwise deterministic and needs no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from interpkernels._outputs import new_output


@triton.jit
def _sparse_decode_kernel(
    values_ptr, indices_ptr, w_ptr, bias_ptr, out_ptr,
    k, d, stride_wm, stride_wd,
    HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n, c] = sum_j values[n, j] * W[indices[n, j], c] + bias[c] for row n = program 0
    and the columns c of d-tile program 1."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    w_cols = cols.to(tl.int64) * stride_wd
    # A 2-D accumulator defers the cross-thread reduction over j to the end.
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for j0 in range(0, k, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        j_ok = j < k
        idx = tl.load(indices_ptr + n * k + j, mask=j_ok, other=0)
        val = tl.load(values_ptr + n * k + j, mask=j_ok, other=0.0).to(tl.float32)
        rows = tl.load(w_ptr + idx[:, None] * stride_wm + w_cols[None, :],
                       mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += val[:, None] * rows.to(tl.float32)
    out = tl.sum(acc, axis=0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + n * d + cols, out.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gathered_dot_kernel(
    dense_ptr, indices_ptr, w_ptr, out_ptr,
    k, d, stride_dn, stride_dd, stride_wm, stride_wd,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n, j] = sum_c W[indices[n, j], c] * dense[n, c] for row n = program 0 and the
    entries j of k-tile program 1."""
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    j_ok = j < k
    idx = tl.load(indices_ptr + n * k + j, mask=j_ok, other=0)
    acc = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for c0 in range(0, d, BLOCK_D):
        cols = c0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        cols64 = cols.to(tl.int64)
        x = tl.load(dense_ptr + n * stride_dn + cols64 * stride_dd, mask=col_ok, other=0.0)
        rows = tl.load(w_ptr + idx[:, None] * stride_wm + cols64[None, :] * stride_wd,
                       mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        acc += rows.to(tl.float32) * x.to(tl.float32)[None, :]
    tl.store(out_ptr + n * k + j, tl.sum(acc, axis=1).to(out_ptr.dtype.element_ty), mask=j_ok)


@triton.jit
def _sparse_transpose_matmul_kernel(
    values_ptr, offsets_ptr, order_ptr, dense_ptr, rows_ptr, sums_ptr,
    k, d, stride_dn, stride_dd,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """For latent i = program 0 and the columns c of d-tile program 1, over the entries
    e = order[offsets[i]:offsets[i+1]] (flat positions n*k + j with indices[n, j] = i):
    rows[i, c] = sum_e values[e] * dense[e // k, c], and (d-tile 0) sums[i] = sum_e values[e]."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < d
    dense_cols = cols.to(tl.int64) * stride_dd
    start = tl.load(offsets_ptr + i)
    end = tl.load(offsets_ptr + i + 1)
    # Fixed-shape partial sums reduced once at the end: the order of every
    # addition depends only on the grouping, never on scheduling.
    acc = tl.zeros([BLOCK_E, BLOCK_D], tl.float32)
    value_acc = tl.zeros([BLOCK_E], tl.float32)
    for e0 in range(start, end, BLOCK_E):
        e = e0 + tl.arange(0, BLOCK_E)
        e_ok = e < end
        flat = tl.load(order_ptr + e, mask=e_ok, other=0)
        val = tl.load(values_ptr + flat, mask=e_ok, other=0.0).to(tl.float32)
        x = tl.load(dense_ptr + (flat // k)[:, None] * stride_dn + dense_cols[None, :],
                    mask=e_ok[:, None] & col_ok[None, :], other=0.0)
        acc += val[:, None] * x.to(tl.float32)
        value_acc += val
    tl.store(rows_ptr + i * d + cols, tl.sum(acc, axis=0).to(rows_ptr.dtype.element_ty), mask=col_ok)
    if tl.program_id(1) == 0:
        tl.store(sums_ptr + i, tl.sum(value_acc, axis=0).to(sums_ptr.dtype.element_ty))


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None = None,
    *, block_k: int | None = None, block_d: int | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """out[n] = sum_j values[n, j] * W[indices[n, j]] + bias: [N, k] code, [M, d] W -> [N, d].

    One program per (row, d-tile of `block_d` columns), gathering `block_k` rows of W at a time."""
    N, k = values.shape
    d = W.shape[1]
    out = new_output(N, d, dtype=W.dtype, device=W.device)
    if out.numel() == 0:
        return out
    block_k = block_k or min(16, triton.next_power_of_2(max(k, 1)))
    block_d = block_d or min(256, triton.next_power_of_2(d))
    values, indices = values.contiguous(), indices.contiguous()
    bias = bias.contiguous() if bias is not None else None
    _sparse_decode_kernel[(N, triton.cdiv(d, block_d))](
        values, indices, W, bias, out, k, d, W.stride(0), W.stride(1),
        HAS_BIAS=bias is not None, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def gathered_dot(
    dense: torch.Tensor, indices: torch.Tensor, W: torch.Tensor,
    *, block_k: int | None = None, block_d: int | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """out[n, j] = W[indices[n, j]] . dense[n] (SDDMM): [N, d] dense, [N, k] indices, [M, d] W -> [N, k].

    One program per (row, k-tile of `block_k` entries), walking d in `block_d` columns."""
    N, k = indices.shape
    d = dense.shape[1]
    out = new_output(N, k, dtype=dense.dtype, device=dense.device)
    if out.numel() == 0:
        return out
    block_k = block_k or min(32, triton.next_power_of_2(k))
    block_d = block_d or min(128, triton.next_power_of_2(max(d, 1)))
    _gathered_dot_kernel[(N, triton.cdiv(k, block_k))](
        dense, indices.contiguous(), W, out, k, d, dense.stride(0), dense.stride(1), W.stride(0), W.stride(1),
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def group_by_latent(indices: torch.Tensor, num_latents: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The N*k entries of a code grouped by latent (CSR of its transpose), on the code's device.

    Returns (offsets [M+1] int64, entry_order [N*k] int64): the entries of latent i are the flat
    positions n*k + j in entry_order[offsets[i]:offsets[i+1]], in increasing order.

    A stable sort of the latent ids gives the order (on CUDA torch sorts integer keys with a
    stable LSD radix sort, i.e. a few counting-sort passes; int32 keys halve them), and
    binary searches of the sorted ids give the offsets: no atomics, so the grouping is
    deterministic and so is every reduction that follows it."""
    flat = indices.reshape(-1)
    if num_latents <= torch.iinfo(torch.int32).max:
        flat = flat.to(torch.int32)
    sorted_ids, entry_order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_latents + 1, dtype=flat.dtype, device=flat.device)
    return torch.searchsorted(sorted_ids, bounds), entry_order


def sparse_transpose_matmul(
    values: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor, num_latents: int,
    groups: tuple[torch.Tensor, torch.Tensor] | None = None,
    *, block_e: int = 16, block_d: int | None = None, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [M, d], value_sums [M]): rows[i] = sum_{indices[n,j]=i} values[n, j] * dense[n] and
    value_sums[i] = sum of the same values; latents without entries get zeros.

    `groups` is `group_by_latent(indices, num_latents)`, built here when not given (pass it to
    share one grouping between products of the same code). One program per (latent, d-tile)
    reduces that latent's entries `block_e` at a time in float32, in the grouping's order:
    results are bitwise identical run to run."""
    k, d = values.shape[1], dense.shape[1]
    offsets, entry_order = groups if groups is not None else group_by_latent(indices, num_latents)
    rows = new_output(num_latents, d, dtype=dense.dtype, device=dense.device)
    value_sums = new_output(num_latents, dtype=values.dtype, device=values.device)
    if num_latents == 0:
        return rows, value_sums
    block_d = block_d or min(256, triton.next_power_of_2(max(d, 1)))
    _sparse_transpose_matmul_kernel[(num_latents, max(1, triton.cdiv(d, block_d)))](
        values.contiguous(), offsets, entry_order, dense, rows, value_sums, k, d, dense.stride(0), dense.stride(1),
        BLOCK_E=block_e, BLOCK_D=block_d, num_warps=num_warps,
    )
    return rows, value_sums
