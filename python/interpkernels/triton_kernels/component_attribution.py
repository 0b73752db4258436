"""Triton kernel for APD's component attribution (docs/OPS.md, SPEC section 5):

    out[n, c] = sum_o (sum_r h[n, c, r] * (B[c, r] . G[n, o]))^2

One program owns token n and a block of components; it walks the outputs in
blocks of BLOCK_O, forms the [BLOCK_O, BLOCK_C] projections G[n, o-block] @
B[c-block, r]^T with tl.dot over d, weights them by h and adds their squares:
[N, O, C] exists only one register tile at a time. Accumulates in float32,
stores in the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _component_attribution_kernel(
    h_ptr, b_ptr, g_ptr, out_ptr,
    C, m, O, d,
    stride_hn, stride_hc, stride_hr, stride_bc, stride_br, stride_bd, stride_gn, stride_go, stride_gd,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[n, c] for token n = program 0 and the components c of block program 1."""
    n = tl.program_id(0).to(tl.int64)
    comps = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    comp_ok = comps < C
    comps64 = comps.to(tl.int64)
    total = tl.zeros([BLOCK_C], tl.float32)
    for o0 in range(0, O, BLOCK_O):
        outs = o0 + tl.arange(0, BLOCK_O)
        out_ok = outs < O
        weighted = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
        for r in range(0, m):
            h_r = tl.load(h_ptr + n * stride_hn + comps64 * stride_hc + r * stride_hr, mask=comp_ok, other=0.0)
            proj = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
            for d0 in range(0, d, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < d
                cols64 = cols.to(tl.int64)
                outs64 = outs[:, None].to(tl.int64)
                g = tl.load(g_ptr + n * stride_gn + outs64 * stride_go + cols64[None, :] * stride_gd,
                            mask=out_ok[:, None] & col_ok[None, :], other=0.0)
                b = tl.load(b_ptr + comps64[None, :] * stride_bc + r * stride_br + cols64[:, None] * stride_bd,
                            mask=col_ok[:, None] & comp_ok[None, :], other=0.0)
                proj = tl.dot(g, b, proj, input_precision=DOT_PRECISION)
            weighted += proj * h_r.to(tl.float32)[None, :]
        total += tl.sum(weighted * weighted, axis=0)
    tl.store(out_ptr + n * C + comps64, total.to(out_ptr.dtype.element_ty), mask=comp_ok)


def component_attribution(h: torch.Tensor, B: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """h [N, C, m], B [C, m, d], G [N, O, d] (strided views welcome) -> out [N, C] in h's dtype."""
    N, C, m = h.shape
    O, d = G.shape[1], G.shape[2]
    out = torch.empty((N, C), dtype=h.dtype, device=h.device)
    if out.numel() == 0:
        return out
    if O == 0 or d == 0:
        return out.zero_()
    # tl.dot wants operands of at least 16 x 16; float32 inputs stay exact (ieee), 16-bit ones
    # take the tensor cores' native path, accumulating in float32 either way.
    block_c = min(64, max(16, triton.next_power_of_2(C)))
    block_o = min(64, max(16, triton.next_power_of_2(O)))
    block_d = min(64, max(16, triton.next_power_of_2(d)))
    grid = (N, triton.cdiv(C, block_c))
    _component_attribution_kernel[grid](
        h, B, G, out, C, m, O, d,
        *h.stride(), *B.stride(), *G.stride(),
        BLOCK_C=block_c, BLOCK_O=block_o, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
    )
    return out
