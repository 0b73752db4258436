"""Triton kernel for APD's component attribution (docs/OPS.md, SPEC section 5), over
decomposed layers l whose terms add before the square (a component spans every layer):

    out[n, c] = sum_o (sum_l sum_r h_l[n, c, r] * (B_l[c, r] . G_l[n, o]))^2

The launcher lays the layers side by side, so that the kernel sees one layer of
rank M = sum_l m_l: h [N, C, M] (the h_l concatenated), G [N, O, D] (the G_l
concatenated along d, D = sum_l d_l), B [C, M, max d_l] (B_l zero-padded), and
per rank row r (of layer l) the first column of its layer in G and its width
d_l. One layer is passed as it is, strides and all. One program owns token n
and a block of components; it walks the outputs in blocks of BLOCK_O, forms
each rank row's [BLOCK_O, BLOCK_C] projections G[n, o-block, its columns] @
B[c-block, r]^T with tl.dot over its own d_l only, weights them by h and adds
them up, then adds their squares: [N, O, C] exists only one register tile at
a time. Accumulates in float32, stores in the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _component_attribution_kernel(
    h_ptr, b_ptr, g_ptr, column_start_ptr, width_ptr, out_ptr,
    C, M, O,
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
        outs64 = outs[:, None].to(tl.int64)
        weighted = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
        for r in range(0, M):
            h_r = tl.load(h_ptr + n * stride_hn + comps64 * stride_hc + r * stride_hr, mask=comp_ok, other=0.0)
            column_start = tl.load(column_start_ptr + r).to(tl.int64)
            width = tl.load(width_ptr + r)
            proj = tl.zeros([BLOCK_O, BLOCK_C], tl.float32)
            for d0 in range(0, width, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < width
                cols64 = cols.to(tl.int64)
                g = tl.load(g_ptr + n * stride_gn + outs64 * stride_go + (column_start + cols64)[None, :] * stride_gd,
                            mask=out_ok[:, None] & col_ok[None, :], other=0.0)
                b = tl.load(b_ptr + comps64[None, :] * stride_bc + r * stride_br + cols64[:, None] * stride_bd,
                            mask=col_ok[:, None] & comp_ok[None, :], other=0.0)
                proj = tl.dot(g, b, proj, input_precision=DOT_PRECISION)
            weighted += proj * h_r.to(tl.float32)[None, :]
        total += tl.sum(weighted * weighted, axis=0)
    tl.store(out_ptr + n * C + comps64, total.to(out_ptr.dtype.element_ty), mask=comp_ok)


def component_attribution(h: list[torch.Tensor], B: list[torch.Tensor], G: list[torch.Tensor]) -> torch.Tensor:
    """Per layer h [N, C, m_l], B [C, m_l, d_l], G [N, O, d_l] (strided views welcome) -> out [N, C]
    in h's dtype."""
    N, C = h[0].shape[:2]
    O = G[0].shape[1]
    widths = [layer_B.shape[2] for layer_B in B]
    out = torch.empty((N, C), dtype=h[0].dtype, device=h[0].device)
    if out.numel() == 0:
        return out
    if O == 0 or sum(widths) == 0:
        return out.zero_()
    if len(h) == 1:
        h_all, B_all, G_all = h[0], B[0], G[0]
    else:
        h_all, G_all = torch.cat(h, 2), torch.cat(G, 2)
        B_all = torch.cat([F.pad(layer_B, (0, max(widths) - width)) for layer_B, width in zip(B, widths)], 1)
    # Per rank row r of layer l: where layer l's columns start in G_all, and how many there are.
    starts = [sum(widths[:l]) for l in range(len(widths))]
    ranks = [layer_h.shape[2] for layer_h in h]
    column_start = torch.tensor([start for start, m in zip(starts, ranks) for _ in range(m)], dtype=torch.int32,
                                device=out.device)
    width = torch.tensor([w for w, m in zip(widths, ranks) for _ in range(m)], dtype=torch.int32, device=out.device)
    # tl.dot wants operands of at least 16 x 16; float32 inputs stay exact (ieee), 16-bit ones
    # take the tensor cores' native path, accumulating in float32 either way.
    block_c = min(64, max(16, triton.next_power_of_2(C)))
    block_o = min(64, max(16, triton.next_power_of_2(O)))
    block_d = min(64, max(16, triton.next_power_of_2(max(widths))))
    grid = (N, triton.cdiv(C, block_c))
    _component_attribution_kernel[grid](
        h_all, B_all, G_all, column_start, width, out, C, h_all.shape[2], O,
        *h_all.stride(), *B_all.stride(), *G_all.stride(),
        BLOCK_C=block_c, BLOCK_O=block_o, BLOCK_D=block_d,
        DOT_PRECISION="ieee" if h[0].dtype == torch.float32 else "tf32",
    )
    return out
