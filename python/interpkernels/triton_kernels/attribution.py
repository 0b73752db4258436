"""Triton kernels of attribution patching (SPEC §4, docs/OPS.md).

    latent_attribution  per row n, slots s < k_c + k_p (clean entries, then patched):
                        union[n, s]  = the slot's latent if s is the first slot holding it, else -1
                        deltas[n, s] = f_p - f_c at that latent, dots[n, s] = W_dec[latent] . grad[n]
    error_attribution   out[n] = (patched_error - clean_error)[n] . grad[n]
    feature_edges       E[n, i, j] = dst_scale[n, i] * (W_enc_dst[dst[n, i]] . W_dec_src[src[n, j]]) * src_values[n, j]
                        pruned per destination (n, i) in registers; only the kept slots are written

All accumulate in float32 and write float32 scores. No atomics: every output
element is written by one program, so results are the same run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _latent_attribution_kernel(
    clean_values_ptr, clean_indices_ptr, patched_values_ptr, patched_indices_ptr, grad_ptr, w_ptr,
    union_ptr, deltas_ptr, dots_ptr,
    k_clean, k_patched, d, stride_gn, stride_gd, stride_wm, stride_wd,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Row n = program 0. A clean slot j is first unless an earlier clean slot
    holds its latent; a patched slot j is first unless a clean slot or an
    earlier patched slot does. f_c, f_p at a latent sum the row's entries
    holding it (the pairwise-equality matrices below)."""
    n = tl.program_id(0).to(tl.int64)
    slots = k_clean + k_patched
    c = tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    c_ok = c < k_clean
    p_ok = p < k_patched
    clean = tl.load(clean_indices_ptr + n * k_clean + c, mask=c_ok, other=-1)
    patched = tl.load(patched_indices_ptr + n * k_patched + p, mask=p_ok, other=-2)
    clean_v = tl.load(clean_values_ptr + n * k_clean + c, mask=c_ok, other=0.0).to(tl.float32)
    patched_v = tl.load(patched_values_ptr + n * k_patched + p, mask=p_ok, other=0.0).to(tl.float32)

    same_cc = (clean[:, None] == clean[None, :]) & c_ok[None, :]        # [slot j, entry t]
    same_cp = (clean[:, None] == patched[None, :]) & p_ok[None, :]
    same_pp = (patched[:, None] == patched[None, :]) & p_ok[None, :]
    same_pc = (patched[:, None] == clean[None, :]) & c_ok[None, :]
    clean_first = c_ok & (tl.sum((same_cc & (c[None, :] < c[:, None])).to(tl.int32), axis=1) == 0)
    patched_first = p_ok & (tl.sum(same_pc.to(tl.int32), axis=1) == 0) & \
        (tl.sum((same_pp & (p[None, :] < p[:, None])).to(tl.int32), axis=1) == 0)
    clean_delta = tl.sum(tl.where(same_cp, patched_v[None, :], 0.0), axis=1) - \
        tl.sum(tl.where(same_cc, clean_v[None, :], 0.0), axis=1)
    patched_delta = tl.sum(tl.where(same_pp, patched_v[None, :], 0.0), axis=1)

    # Dots of the first slots only: the rows of repeated latents are never read.
    clean_acc = tl.zeros([BLOCK_C, BLOCK_D], tl.float32)
    patched_acc = tl.zeros([BLOCK_P, BLOCK_D], tl.float32)
    clean_rows = clean.to(tl.int64) * stride_wm
    patched_rows = patched.to(tl.int64) * stride_wm
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < d
        cols64 = cols.to(tl.int64)
        g = tl.load(grad_ptr + n * stride_gn + cols64 * stride_gd, mask=col_ok, other=0.0).to(tl.float32)
        w_c = tl.load(w_ptr + clean_rows[:, None] + cols64[None, :] * stride_wd,
                      mask=clean_first[:, None] & col_ok[None, :], other=0.0)
        w_p = tl.load(w_ptr + patched_rows[:, None] + cols64[None, :] * stride_wd,
                      mask=patched_first[:, None] & col_ok[None, :], other=0.0)
        clean_acc += w_c.to(tl.float32) * g[None, :]
        patched_acc += w_p.to(tl.float32) * g[None, :]

    out_c = n * slots + c
    out_p = n * slots + k_clean + p
    tl.store(union_ptr + out_c, tl.where(clean_first, clean, -1), mask=c_ok)
    tl.store(deltas_ptr + out_c, tl.where(clean_first, clean_delta, 0.0), mask=c_ok)
    tl.store(dots_ptr + out_c, tl.sum(clean_acc, axis=1), mask=c_ok)
    tl.store(union_ptr + out_p, tl.where(patched_first, patched, -1), mask=p_ok)
    tl.store(deltas_ptr + out_p, tl.where(patched_first, patched_delta, 0.0), mask=p_ok)
    tl.store(dots_ptr + out_p, tl.sum(patched_acc, axis=1), mask=p_ok)


@triton.jit
def _error_attribution_kernel(
    clean_ptr, patched_ptr, grad_ptr, out_ptr, N, d,
    stride_cn, stride_cd, stride_pn, stride_pd, stride_gn, stride_gd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out[n] = sum_c (patched[n, c] - clean[n, c]) * grad[n, c] for the BLOCK_N rows of program 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        ok = row_ok[:, None] & (cols < d)[None, :]
        cols64 = cols.to(tl.int64)
        clean = tl.load(clean_ptr + rows64[:, None] * stride_cn + cols64[None, :] * stride_cd, mask=ok, other=0.0)
        patched = tl.load(patched_ptr + rows64[:, None] * stride_pn + cols64[None, :] * stride_pd, mask=ok,
                          other=0.0)
        g = tl.load(grad_ptr + rows64[:, None] * stride_gn + cols64[None, :] * stride_gd, mask=ok, other=0.0)
        acc += (patched.to(tl.float32) - clean.to(tl.float32)) * g.to(tl.float32)
    tl.store(out_ptr + rows64, tl.sum(acc, axis=1), mask=row_ok)


@triton.jit
def _feature_edges_kernel(
    src_values_ptr, src_indices_ptr, w_dec_ptr, dst_indices_ptr, w_enc_ptr, dst_scale_ptr,
    values_ptr, slots_ptr,
    k_src, k_dst, d, kept, threshold,
    stride_dm, stride_dd, stride_em, stride_ed,
    RANK: tl.constexpr, HAS_THRESHOLD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_DST: tl.constexpr, BLOCK_SRC: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token n = program 0, destinations i of tile program 1: the [BLOCK_DST,
    BLOCK_SRC] block of E, built by a tl.dot over d of the gathered encoder and
    decoder rows, is pruned in registers. RANK (top_k): `kept` rounds each
    take the largest remaining |E| (NaN as +inf), ties to the lower j, and
    stop at the threshold; else the entries with |E| >= threshold are
    compacted in j order (a prefix sum gives each its column). The other
    columns of the `kept` get slot -1 and value 0."""
    n = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK_DST + tl.arange(0, BLOCK_DST)
    j = tl.arange(0, BLOCK_SRC)
    i_ok = i < k_dst
    j_ok = j < k_src
    dst = tl.load(dst_indices_ptr + n * k_dst + i, mask=i_ok, other=0).to(tl.int64)
    src = tl.load(src_indices_ptr + n * k_src + j, mask=j_ok, other=0).to(tl.int64)
    virtual = tl.zeros([BLOCK_DST, BLOCK_SRC], tl.float32)
    for d0 in range(0, d, BLOCK_D):
        cols = (d0 + tl.arange(0, BLOCK_D)).to(tl.int64)
        col_ok = cols < d
        enc = tl.load(w_enc_ptr + dst[:, None] * stride_em + cols[None, :] * stride_ed,
                      mask=i_ok[:, None] & col_ok[None, :], other=0.0)
        dec = tl.load(w_dec_ptr + src[:, None] * stride_dm + cols[None, :] * stride_dd,
                      mask=j_ok[:, None] & col_ok[None, :], other=0.0)
        virtual = tl.dot(enc, tl.trans(dec), virtual, input_precision=DOT_PRECISION)
    scale = tl.load(dst_scale_ptr + n * k_dst + i, mask=i_ok, other=0.0).to(tl.float32)
    source = tl.load(src_values_ptr + n * k_src + j, mask=j_ok, other=0.0).to(tl.float32)
    edges = scale[:, None] * virtual * source[None, :]
    key = tl.where(edges != edges, float("inf"), tl.abs(edges))
    key = tl.where(j_ok[None, :], key, -1.0)  # padding columns rank below every real edge
    out_rows = (n * k_dst + i.to(tl.int64)) * kept
    if RANK:
        for t in range(0, kept):
            best = tl.max(key, axis=1)
            chosen = tl.min(tl.where(key == best[:, None], j[None, :], BLOCK_SRC), axis=1)
            hit = j[None, :] == chosen[:, None]
            value = tl.sum(tl.where(hit, edges, 0.0), axis=1)
            survives = best >= 0
            if HAS_THRESHOLD:
                survives = survives & (best >= threshold)
            tl.store(values_ptr + out_rows + t, tl.where(survives, value, 0.0), mask=i_ok)
            tl.store(slots_ptr + out_rows + t, tl.where(survives, chosen, -1).to(tl.int64), mask=i_ok)
            key = tl.where(hit, -1.0, key)
    else:
        survives = key >= 0
        if HAS_THRESHOLD:
            survives = survives & (key >= threshold)
        column = tl.cumsum(survives.to(tl.int32), axis=1) - 1
        count = tl.sum(survives.to(tl.int32), axis=1)
        at = out_rows[:, None] + column
        store_ok = i_ok[:, None] & survives
        tl.store(values_ptr + at, edges, mask=store_ok)
        tl.store(slots_ptr + at, (j[None, :] + tl.zeros_like(column)).to(tl.int64), mask=store_ok)
        # The columns after the survivors: disjoint from those written above.
        pad = i_ok[:, None] & j_ok[None, :] & (j[None, :] >= count[:, None])
        tl.store(values_ptr + out_rows[:, None] + j[None, :], tl.zeros_like(edges), mask=pad)
        tl.store(slots_ptr + out_rows[:, None] + j[None, :], tl.full([BLOCK_DST, BLOCK_SRC], -1, tl.int64), mask=pad)


def _score_tensor(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=like.device)


def latent_attribution(
    clean_values: torch.Tensor, clean_indices: torch.Tensor, patched_values: torch.Tensor,
    patched_indices: torch.Tensor, grad: torch.Tensor, W_dec: torch.Tensor,
    *, block_d: int | None = None, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(deltas, dots, union_indices), each [N, k_c + k_p]: one program per row, whole supports in registers."""
    N, k_clean = clean_indices.shape
    k_patched = patched_indices.shape[1]
    d = grad.shape[1]
    slots = k_clean + k_patched
    union = torch.empty(N, slots, dtype=torch.int64, device=grad.device)
    deltas, dots = _score_tensor((N, slots), grad), _score_tensor((N, slots), grad)
    if union.numel() == 0:
        return deltas, dots, union
    block_d = block_d or min(64, triton.next_power_of_2(max(d, 1)))
    _latent_attribution_kernel[(N,)](
        clean_values.contiguous(), clean_indices.contiguous(), patched_values.contiguous(),
        patched_indices.contiguous(), grad, W_dec, union, deltas, dots,
        k_clean, k_patched, d, grad.stride(0), grad.stride(1), W_dec.stride(0), W_dec.stride(1),
        BLOCK_C=triton.next_power_of_2(max(k_clean, 1)), BLOCK_P=triton.next_power_of_2(max(k_patched, 1)),
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return deltas, dots, union


def error_attribution(
    clean_error: torch.Tensor, patched_error: torch.Tensor, grad: torch.Tensor,
    *, block_n: int = 16, block_d: int | None = None, num_warps: int = 4,
) -> torch.Tensor:
    """out [N] float32: the row-wise dot of patched_error - clean_error with grad."""
    N, d = grad.shape
    out = _score_tensor((N,), grad)
    if N == 0:
        return out
    block_d = block_d or min(128, triton.next_power_of_2(max(d, 1)))
    _error_attribution_kernel[(triton.cdiv(N, block_n),)](
        clean_error, patched_error, grad, out, N, d, clean_error.stride(0), clean_error.stride(1),
        patched_error.stride(0), patched_error.stride(1), grad.stride(0), grad.stride(1),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def feature_edges(
    src_values: torch.Tensor, src_indices: torch.Tensor, W_dec_src: torch.Tensor, dst_indices: torch.Tensor,
    W_enc_dst: torch.Tensor, dst_scale: torch.Tensor, top_k: int | None, threshold: float | None,
    *, block_dst: int = 16, block_d: int | None = None, num_warps: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, k_dst, K] float32, src_slots [N, k_dst, K] int64), K = min(top_k, k_src) or k_src.

    One program per (token, tile of `block_dst` destinations) holds the tile's
    whole [block_dst, k_src] block of edges (tl.dot tiles are at least 16)."""
    N, k_src = src_indices.shape
    k_dst, d = dst_indices.shape[1], W_dec_src.shape[1]
    kept = k_src if top_k is None else min(top_k, k_src)
    values = _score_tensor((N, k_dst, kept), src_values)
    slots = torch.empty(N, k_dst, kept, dtype=torch.int64, device=src_values.device)
    if values.numel() == 0:
        return values, slots
    block_d = block_d or min(64, max(16, triton.next_power_of_2(d)))
    _feature_edges_kernel[(N, triton.cdiv(k_dst, block_dst))](
        src_values.contiguous(), src_indices.contiguous(), W_dec_src, dst_indices.contiguous(), W_enc_dst,
        dst_scale.contiguous(), values, slots,
        k_src, k_dst, d, kept, 0.0 if threshold is None else threshold,
        W_dec_src.stride(0), W_dec_src.stride(1), W_enc_dst.stride(0), W_enc_dst.stride(1),
        RANK=top_k is not None, HAS_THRESHOLD=threshold is not None,
        DOT_PRECISION="ieee" if W_dec_src.dtype == torch.float32 else "tf32",
        BLOCK_DST=block_dst, BLOCK_SRC=max(16, triton.next_power_of_2(k_src)), BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return values, slots
