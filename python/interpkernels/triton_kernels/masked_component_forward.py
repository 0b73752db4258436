"""Triton kernel for SPD's masked forward through a decomposed linear layer
(docs/OPS.md, SPEC section 5):

    out[n] = sum_j (h[n, j] * mask[n, j]) U[j] + delta_mask[n] * (W_delta x[n]) + bias

j runs over the C * m component pieces (rank m: the wrapper repeats each
component's mask over its pieces). One program owns a [BLOCK_N, BLOCK_D] tile
of out: the mask is applied to each h tile as it is loaded for tl.dot, and the
delta GEMM runs into a second accumulator scaled per row at the end, so
neither h * mask [N, C] nor x W_delta^T [N, d_out] is ever written out (ATen's
version writes both). Accumulates in float32, stores in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _masked_component_forward_kernel(
    x_ptr, h_ptr, mask_ptr, u_ptr, w_ptr, delta_mask_ptr, bias_ptr, out_ptr,
    N, J, d_in, d_out,
    stride_xn, stride_xi, stride_hn, stride_hj, stride_mn, stride_mj, stride_uj, stride_ud,
    stride_wd, stride_wi, stride_dm, stride_on, stride_od,
    HAS_DELTA: tl.constexpr, HAS_DELTA_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[rows, cols] for the rows of block program 0 and the output columns of block program 1."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < d_out
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j0 in range(0, J, BLOCK_K):
        pieces = j0 + tl.arange(0, BLOCK_K)
        piece_ok = pieces < J
        pieces64 = pieces.to(tl.int64)
        tile_ok = row_ok[:, None] & piece_ok[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_hn + pieces64[None, :] * stride_hj, mask=tile_ok, other=0.0)
        m = tl.load(mask_ptr + rows64[:, None] * stride_mn + pieces64[None, :] * stride_mj, mask=tile_ok, other=0.0)
        u = tl.load(u_ptr + pieces64[:, None] * stride_uj + cols64[None, :] * stride_ud,
                    mask=piece_ok[:, None] & col_ok[None, :], other=0.0)
        # The product is rounded to the input dtype before the GEMM, as h * mask is in ATen's version.
        masked = (h.to(tl.float32) * m.to(tl.float32)).to(u.dtype)
        acc = tl.dot(masked, u, acc, input_precision=DOT_PRECISION)
    if HAS_DELTA:
        delta = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for i0 in range(0, d_in, BLOCK_K):
            ins = i0 + tl.arange(0, BLOCK_K)
            in_ok = ins < d_in
            ins64 = ins.to(tl.int64)
            x = tl.load(x_ptr + rows64[:, None] * stride_xn + ins64[None, :] * stride_xi,
                        mask=row_ok[:, None] & in_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[None, :] * stride_wd + ins64[:, None] * stride_wi,  # W_delta^T tile
                        mask=in_ok[:, None] & col_ok[None, :], other=0.0)
            delta = tl.dot(x, w, delta, input_precision=DOT_PRECISION)
        if HAS_DELTA_MASK:
            scale = tl.load(delta_mask_ptr + rows64 * stride_dm, mask=row_ok, other=0.0).to(tl.float32)
            delta = delta * scale[:, None]
        acc += delta
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols64, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_on + cols64[None, :] * stride_od, acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


def masked_component_forward(x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, U: torch.Tensor,
                             W_delta: torch.Tensor | None, delta_mask: torch.Tensor | None,
                             bias: torch.Tensor | None) -> torch.Tensor:
    """x [N, d_in], h and mask [N, J], U [J, d_out], W_delta [d_out, d_in], delta_mask [N],
    bias [d_out] (strided views welcome) -> out [N, d_out] in x's dtype."""
    N, J = h.shape
    d_out, d_in = U.shape[1], x.shape[1]
    out = torch.empty((N, d_out), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # tl.dot wants operands of at least 16 x 16; float32 inputs stay exact (ieee), 16-bit ones
    # take the tensor cores' native path, accumulating in float32 either way.
    block_n = min(64, max(16, triton.next_power_of_2(N)))
    block_d = min(64, max(16, triton.next_power_of_2(d_out)))
    block_k = 32
    grid = (triton.cdiv(N, block_n), triton.cdiv(d_out, block_d))
    _masked_component_forward_kernel[grid](
        x, h, mask, U, W_delta, delta_mask, bias, out,
        N, J, d_in, d_out,
        *x.stride(), *h.stride(), *mask.stride(), *U.stride(),
        *(W_delta.stride() if W_delta is not None else (0, 0)), delta_mask.stride(0) if delta_mask is not None else 0,
        *out.stride(),
        HAS_DELTA=W_delta is not None, HAS_DELTA_MASK=delta_mask is not None, HAS_BIAS=bias is not None,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return out
