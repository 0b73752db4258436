"""Fused TopK encoder: the GEMM and a running per-row top-k, without the [N, M] matrix.

    pre[n, i]    = (x[n] - pre_bias) . W_enc[i] + b_enc[i]
    indices[n]   = the k highest-ranked latents of row n over those latent_mask keeps in
    values[n, j] = relu(pre[n, indices[n, j]]) (NaN stays NaN), each row in rank order

The rank (every backend's): NaN first; then, given `threshold`, latents with
pre > threshold[i] before the others; then larger pre; then the lower latent.

Each (pre, latent) pair is packed into one int64 key whose signed order is the
rank:
    bit 63       clear for a latent of the upper tier (pre > threshold, or NaN,
                 or every latent without a threshold), set for the others
    bits 31..62  an order-preserving unsigned image of the float32 pre, every NaN
                 mapped to one image above +inf's
    bits 0..30   INDEX_BASE - latent, so among equal pre the lower latent has the
                 larger key.
Keys are unique within a row, so values-only reductions and sorts (tl.max,
tl.min, tl.topk) carry the indices along.

Two kernels:
1. `_topk_partial_kernel`, program (row block, latent split): streams the split's
   latents in tiles through `tl.dot` and keeps the k best keys of each row in
   registers. A tile key is a candidate only if it beats the row's current
   k-th best (the set's minimum). A tile where no row has a candidate costs one
   count and one compare per element. Where some row has more than
   INSERT_LIMIT candidates (the first tiles), the tile is selected and merged
   at once: tl.topk of the tile, then tl.topk of that and the running set.
   Otherwise each row's best remaining candidate replaces the row's minimum,
   one candidate per step, which is cheaper than two sorts for a few.
2. `_topk_merge_kernel`, program (row block): tl.topk of the splits' candidates,
   decoded into values and indices.

x is centred on pre_bias once, by the launcher (`x - pre_bias` in x's dtype,
as torch and the CPU kernel round it), not in every latent tile.

On CUDA the partial kernel is autotuned over tile shapes and pipeline stages
(keyed on d, M, k and the dtype); explicit block sizes, or the interpreter,
launch one configuration.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from interpkernels._outputs import new_output

# Below every key of a real latent: fills empty slots and masked-out latents.
_MIN_KEY = tl.constexpr(-(2**63))
# Above every key: padding slots k..K_PAD-1 of the running set, never its minimum.
_MAX_KEY = tl.constexpr(2**63 - 1)
# Low 31 bits of a key: latent ^ INDEX_BASE = INDEX_BASE - latent, for latent < 2^31.
_INDEX_BASE = tl.constexpr(2**31 - 1)
# The image of every NaN: that of the positive quiet NaN 0x7FC00000, above +inf's 0xFF800000.
_NAN_IMAGE = tl.constexpr(0xFFC00000)
# The fewest rows an MMA tile needs for Hopper's wgmma (one warpgroup); Triton falls back to mma.sync below.
_WGMMA_ROWS = tl.constexpr(64)


@triton.jit
def _pack_keys(pre, latents):
    """Upper-tier rank keys [BLOCK_N, BLOCK_M] of float32 pre at latents [BLOCK_M] (module
    docstring); a lower-tier key is the same with bit 63 set."""
    bits = pre.to(tl.int32, bitcast=True)
    unsigned_bits = bits.to(tl.int64) & 0xFFFFFFFF
    # Offset binary: a non-negative float gets its sign bit set, a negative one all bits flipped.
    image = tl.where(bits < 0, unsigned_bits ^ 0xFFFFFFFF, unsigned_bits | 0x80000000)
    image = tl.where(pre != pre, _NAN_IMAGE, image)
    return (image << 31) | (latents.to(tl.int64) ^ _INDEX_BASE)[None, :]


@triton.jit
def _unpack_keys(keys):
    """(pre as float32, latent) of keys made by _pack_keys."""
    image = (keys >> 31) & 0xFFFFFFFF
    bits = tl.where(image >= 0x80000000, image ^ 0x80000000, image ^ 0xFFFFFFFF)
    pre = bits.to(tl.int32).to(tl.float32, bitcast=True)
    return pre, (keys & _INDEX_BASE) ^ _INDEX_BASE


@triton.jit
def _topk_partial_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr, threshold_ptr, keys_ptr,
    N, M, d, k, latents_per_split,
    stride_xn, stride_xd, stride_wm, stride_wd,
    HAS_MASK: tl.constexpr, HAS_THRESHOLD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    K_PAD: tl.constexpr, INSERT_LIMIT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """keys[n, s, :k] = the k largest keys of pre[n, i] over latents i of split s = program 1
    (latents [s * latents_per_split, (s + 1) * latents_per_split) ∩ [0, M)), unordered,
    for rows n of row block program 0. Slots no latent filled keep keys below MIN_KEY + k."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = rows.to(tl.int64) * stride_xn
    slot = tl.arange(0, K_PAD)
    slot64 = slot.to(tl.int64)
    # Distinct initial keys keep "the slot holding the row minimum" unique.
    best = tl.broadcast_to(tl.where(slot < k, slot64 + _MIN_KEY, slot64 ^ _MAX_KEY)[None, :], [BLOCK_N, K_PAD])
    threshold = tl.min(best, axis=1)

    first = tl.program_id(1) * latents_per_split
    last = tl.minimum(first + latents_per_split, M)
    for m0 in range(first, last, BLOCK_M):
        latents = m0 + tl.arange(0, BLOCK_M)
        latent_ok = latents < last
        w_rows = latents.to(tl.int64) * stride_wm
        # Hopper's wgmma multiplies tiles of at least 64 rows (its M side, one warpgroup). A
        # shorter row tile (large k: the running set's registers grow with BLOCK_N x K_PAD)
        # computes the transposed product, latents on the M side, and transposes it back.
        if BLOCK_N < _WGMMA_ROWS:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for c0 in range(0, d, BLOCK_D):
            cols = c0 + tl.arange(0, BLOCK_D)
            col_ok = cols < d
            cols64 = cols.to(tl.int64)
            x = tl.load(x_ptr + x_rows[:, None] + cols64[None, :] * stride_xd,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            w = tl.load(w_ptr + w_rows[:, None] + cols64[None, :] * stride_wd,
                        mask=latent_ok[:, None] & col_ok[None, :], other=0.0)
            if BLOCK_N < _WGMMA_ROWS:
                acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            else:
                acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
        if BLOCK_N < _WGMMA_ROWS:
            acc = tl.trans(acc)
        pre = acc + tl.load(b_ptr + latents, mask=latent_ok, other=0.0).to(tl.float32)[None, :]
        # pre is never -0.0 (the accumulator starts at +0.0), so equal pre have equal bits.
        tile = _pack_keys(pre, latents)
        if HAS_THRESHOLD:
            theta = tl.load(threshold_ptr + latents, mask=latent_ok, other=0.0).to(tl.float32)
            below = (pre == pre) & ~(pre > theta[None, :])  # NaN stays in the upper tier
            tile = tl.where(below, tile | _MIN_KEY, tile)
        keep = latent_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + latents, mask=latent_ok, other=0) != 0)
        tile = tl.where(keep[None, :], tile, _MIN_KEY)

        most_candidates = tl.max(tl.sum((tile > threshold[:, None]).to(tl.int32), axis=1), axis=0)
        if K_PAD <= BLOCK_M and most_candidates > INSERT_LIMIT:
            # The k largest of the running set's k keys and the tile's, into slots 0..k-1
            # (the padding slots keep their keys). They stay distinct: the set's keys above
            # its minimum and the tile's candidates are distinct latents, and a row without
            # candidates gets its own keys back.
            real = (slot < k)[None, :]
            tile_best = tl.topk(tile, K_PAD)
            both = tl.reshape(tl.join(tl.where(real, best, _MIN_KEY), tile_best), [BLOCK_N, 2 * K_PAD])
            best = tl.where(real, tl.topk(both, K_PAD), best)
            threshold = tl.min(best, axis=1)
        elif most_candidates > 0:
            top = tl.max(tile, axis=1)
            while tl.max((top > threshold).to(tl.int32), axis=0) > 0:
                enters = top > threshold
                best = tl.where(enters[:, None] & (best == threshold[:, None]), top[:, None], best)
                threshold = tl.min(best, axis=1)
                tile = tl.where(tile == top[:, None], _MIN_KEY, tile)
                top = tl.max(tile, axis=1)

    width = tl.num_programs(1) * k
    out = keys_ptr + rows.to(tl.int64)[:, None] * width + tl.program_id(1) * k + slot[None, :]
    tl.store(out, best, mask=row_ok[:, None] & (slot < k)[None, :])


@triton.jit
def _topk_merge_kernel(
    keys_ptr, values_ptr, indices_ptr, N, width, k,
    K_PAD: tl.constexpr, WIDTH_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """For rows n of program 0: the k largest of keys[n, :width], in decreasing order, as
    values[n, j] = relu(pre) and indices[n, j] = latent."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    c = tl.arange(0, WIDTH_PAD)
    keys = tl.load(keys_ptr + rows64[:, None] * width + c[None, :],
                   mask=row_ok[:, None] & (c < width)[None, :], other=_MIN_KEY)
    top = tl.topk(keys, K_PAD)  # [BLOCK_R, K_PAD], decreasing
    pre, latent = _unpack_keys(top)
    j = tl.arange(0, K_PAD)
    out = rows64[:, None] * k + j[None, :]
    ok = row_ok[:, None] & (j < k)[None, :]
    relu = tl.where(pre < 0.0, 0.0, pre)  # tl.maximum would turn NaN into 0
    tl.store(values_ptr + out, relu.to(values_ptr.dtype.element_ty), mask=ok)
    tl.store(indices_ptr + out, latent, mask=ok)


def _default_splits(device: torch.device, row_blocks: int, M: int, k_pad: int, block_m: int) -> int:
    """Enough latent splits for ~2 programs per SM, each split still spanning many k's worth of
    latents (the running top-k fills up once per split)."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, row_blocks), M // (8 * max(k_pad, block_m))))


# A tile with at most this many candidates in every row inserts them one by one; more
# (in any row) and it is sorted and merged. A guess from operation counts (an insertion
# step and a bitonic stage each cost about one pass over the tile), not yet measured.
INSERT_LIMIT = 8
# Every default and autotuned configuration's latent tile (splits are multiples of it): 64, wgmma's
# M side where the latents are on it, and a tile of keys small enough to sort in registers.
_BLOCK_M = 64


def _default_tiles(k_pad: int, sixteen_bit: bool) -> tuple[int, int, int]:
    """(block_n, block_m, block_d) that compile for sm_90 at 8 warps without spilling registers
    (tests/triton_sm90.py checks each k_pad up to 256, with triton 3.6 and 3.9). The running set
    holds BLOCK_N x K_PAD int64 keys, so rows shrink as k grows: 64 rows up to k = 64 (tokens on
    wgmma's M side), 32 up to 256 (latents on it, see the kernel). float32 multiplies with FMAs
    (IEEE), whose operand slices of BLOCK_D sit in registers: it takes 16 of depth."""
    if sixteen_bit:
        return max(16, min(64 if k_pad <= 64 else 32, 8192 // k_pad)), _BLOCK_M, 64
    return max(16, min(32, 8192 // k_pad)), _BLOCK_M, 16


def tuning_configs(k_pad: int, sixteen_bit: bool) -> list[triton.Config]:
    """The autotuner's candidates: the default tiles and (16-bit) half as many rows, at 8 warps and
    3 or 4 stages. The shapes around them spill registers on triton 3.6 or 3.9: 4 warps, wider or
    deeper 16-bit tiles, float32 at other shapes (tests/triton_sm90.py checks these)."""
    block_n, block_m, block_d = _default_tiles(k_pad, sixteen_bit)
    shapes = {(block_n, block_m, block_d)}
    if sixteen_bit:
        shapes.add((max(16, block_n // 2), block_m, block_d))
    return [triton.Config(dict(BLOCK_N=n, BLOCK_M=m, BLOCK_D=depth), num_warps=8, num_stages=stages)
            for n, m, depth in sorted(shapes) for stages in (3, 4)]


@functools.cache
def _tuned_partial_kernel(k_pad: int, sixteen_bit: bool):
    """The partial kernel autotuned over tuning_configs, keyed on d, M, K_PAD (and, by
    Triton, the argument dtypes); one autotuner per (K_PAD, 16-bit), made on first use."""
    return triton.autotune(configs=tuning_configs(k_pad, sixteen_bit), key=["d", "M", "K_PAD"])(_topk_partial_kernel)


def topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int,
    pre_bias: torch.Tensor | None = None, latent_mask: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    *, block_n: int | None = None, block_m: int | None = None, block_d: int | None = None,
    splits: int | None = None, num_warps: int = 8, num_stages: int = 3, insert_limit: int = INSERT_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [N, k] in x's dtype, indices [N, k] int64): the TopK code of
    relu((x - pre_bias) @ W_enc.T + b_enc) over the latents latent_mask keeps in, rows in
    rank order (module docstring; `threshold` [M] sets the tiers).

    Requires 1 <= k <= (number of latents latent_mask keeps in) and M < 2^31. float32 inputs
    multiply in IEEE float32 (not tf32). On CUDA without block sizes given, the tiles, warps
    and stages are autotuned; otherwise `block_n` rows x `block_m` latents per tile (both
    >= 16, powers of two; `block_d` too) with `num_warps` / `num_stages`. `splits` of the
    latent range run as separate programs (default: enough to fill the GPU);
    `insert_limit` is INSERT_LIMIT (module docstring)."""
    N, d = x.shape
    M = W_enc.shape[0]
    values = new_output(N, k, dtype=x.dtype, device=x.device)
    indices = new_output(N, k, dtype=torch.int64, device=x.device)
    if N == 0:
        return values, indices
    centered = x if pre_bias is None else x - pre_bias
    k_pad = triton.next_power_of_2(k)
    sixteen_bit = x.dtype != torch.float32
    autotuned = x.device.type == "cuda" and block_n is None and block_m is None and block_d is None
    default_n, default_m, default_d = _default_tiles(k_pad, sixteen_bit)
    block_n, block_m, block_d = block_n or default_n, block_m or default_m, block_d or default_d
    # Splits are whole multiples of every tile width a launch may use.
    split_unit = _BLOCK_M if autotuned else block_m
    splits = splits or _default_splits(x.device, triton.cdiv(N, block_n), M, k_pad, block_m)
    latents_per_split = triton.cdiv(triton.cdiv(M, splits), split_unit) * split_unit
    splits = triton.cdiv(M, latents_per_split)

    keys = torch.empty(N, splits * k, dtype=torch.int64, device=x.device)
    arguments = (
        centered, W_enc, b_enc.contiguous(),
        latent_mask.contiguous().view(torch.uint8) if latent_mask is not None else None,
        threshold.contiguous() if threshold is not None else None, keys,
        N, M, d, k, latents_per_split, centered.stride(0), centered.stride(1), W_enc.stride(0), W_enc.stride(1),
    )
    constants = dict(
        HAS_MASK=latent_mask is not None, HAS_THRESHOLD=threshold is not None,
        DOT_PRECISION="tf32" if sixteen_bit else "ieee",  # tf32: the default, moot for 16-bit inputs
        K_PAD=k_pad, INSERT_LIMIT=insert_limit,
    )
    if autotuned:
        _tuned_partial_kernel(k_pad, sixteen_bit)[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits)](
            *arguments, **constants)
    else:
        _topk_partial_kernel[(triton.cdiv(N, block_n), splits)](
            *arguments, **constants, BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps,
            num_stages=num_stages)
    width = splits * k
    width_pad = triton.next_power_of_2(width)
    block_r = max(1, min(triton.next_power_of_2(N), 4096 // width_pad))
    _topk_merge_kernel[(triton.cdiv(N, block_r),)](
        keys, values, indices, N, width, k, K_PAD=k_pad, WIDTH_PAD=width_pad, BLOCK_R=block_r,
    )
    return values, indices
