"""The Triton kernels (interpkernels.triton_kernels) against the float64 references (docs/OPS.md).

On a GPU they run on CUDA tensors; without one, under the Triton interpreter on CPU
tensors, at tiny sizes with small blocks (16 is the smallest tile `tl.dot` compiles).
"""

import pytest
import torch
from devices import TRITON_DEVICE
from oracle import LOW_PRECISION, assert_matches_oracle, max_error

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_as_on_gpu")

from interpkernels import reference  # noqa: E402
from interpkernels import triton_kernels as tk  # noqa: E402

DEVICE = TRITON_DEVICE
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
SMALL_DECODE = dict(block_k=4, block_d=16)
SMALL_ENCODE = dict(block_n=16, block_m=16, block_d=16)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def make_code(N, k, M, dtype, *, unique=True):
    """Values bounded away from zero (both signs) and indices, unique per row unless asked."""
    values = torch.randn(N, k, dtype=torch.float64)
    values = (values + values.sign() * 0.1).to(dtype=dtype, device=DEVICE)
    if unique:
        indices = torch.rand(N, M).argsort(dim=-1)[:, :k]
    else:
        indices = torch.randint(0, M, (N, k))
    return values, indices.to(DEVICE)


def check(actual, oracle, torch_same_dtype=None):
    """assert_matches_oracle on CPU copies, with torch's own low-precision result when needed."""
    assert_matches_oracle(actual.cpu(), oracle.cpu(), None if torch_same_dtype is None else torch_same_dtype.cpu())


# (N, k, M, d): 1s, primes, k = M, d = 1, d and M not multiples of the blocks.
DECODE_SHAPES = [(1, 1, 1, 1), (7, 5, 31, 19), (5, 13, 13, 33), (3, 3, 50, 1)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("N,k,M,d", DECODE_SHAPES)
def test_sparse_decode_and_gathered_dot(N, k, M, d, dtype):
    values, indices = make_code(N, k, M, dtype)
    W, bias, dense = randn(M, d, dtype=dtype), randn(d, dtype=dtype), randn(N, d, dtype=dtype)
    low = dtype in LOW_PRECISION

    out = tk.sparse_decode(values, indices, W, bias, **SMALL_DECODE)
    assert out.dtype == dtype
    check(out, reference.sparse_decode(values.double(), indices, W.double(), bias.double()),
          reference.sparse_decode(values, indices, W, bias) if low else None)
    check(tk.sparse_decode(values, indices, W, **SMALL_DECODE),
          reference.sparse_decode(values.double(), indices, W.double()),
          reference.sparse_decode(values, indices, W) if low else None)

    dots = tk.gathered_dot(dense, indices, W, **SMALL_DECODE)
    assert dots.dtype == dtype
    check(dots, reference.gathered_dot(dense.double(), indices, W.double()),
          reference.gathered_dot(dense, indices, W) if low else None)


def test_decode_products_take_strided_weights_and_repeated_indices():
    N, k, M, d = 6, 4, 9, 20
    values, indices = make_code(N, k, M, torch.float32, unique=False)
    W = randn(d, M).T  # a transposed view, as dictionary_learning stores its decoder
    dense = randn(N, 2 * d)[:, ::2]
    assert not (W.is_contiguous() or dense.is_contiguous())
    check(tk.sparse_decode(values, indices, W, **SMALL_DECODE),
          reference.sparse_decode(values.double(), indices, W.double()))
    check(tk.gathered_dot(dense, indices, W, **SMALL_DECODE),
          reference.gathered_dot(dense.double(), indices, W.double()))
    rows, sums = tk.sparse_transpose_matmul(values, indices, dense, M, block_e=4, block_d=16)
    want_rows, want_sums = reference.sparse_transpose_matmul(values.double(), indices, dense.double(), M)
    check(rows, want_rows)
    check(sums, want_sums)


def test_group_by_latent_is_a_stable_csr_of_the_transpose():
    N, k, M = 13, 4, 30  # 52 entries over 30 latents: repeats and empty latents
    indices = torch.randint(0, M, (N, k)).to(DEVICE)
    offsets, order = tk.group_by_latent(indices, M)
    assert offsets.dtype == order.dtype == torch.int64 and offsets.device == indices.device
    flat = indices.reshape(-1).cpu()
    counts = torch.bincount(flat, minlength=M)
    assert (counts == 0).any() and (counts > 1).any()
    assert torch.equal(offsets.cpu(), torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    assert torch.equal(order.cpu(), torch.sort(flat, stable=True).indices)  # increasing n*k+j within a latent


# (N, k, M, d, unique): empty latents, latents with more entries than block_e, a single latent.
TRANSPOSE_SHAPES = [(11, 3, 40, 19, True), (23, 4, 5, 7, False), (4, 1, 1, 1, True)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("N,k,M,d,unique", TRANSPOSE_SHAPES)
def test_sparse_transpose_matmul(N, k, M, d, unique, dtype):
    values, indices = make_code(N, k, M, dtype, unique=unique)
    dense = randn(N, d, dtype=dtype)
    rows, sums = tk.sparse_transpose_matmul(values, indices, dense, M, block_e=4, block_d=16)
    assert rows.dtype == sums.dtype == dtype
    want_rows, want_sums = reference.sparse_transpose_matmul(values.double(), indices, dense.double(), M)
    same = reference.sparse_transpose_matmul(values, indices, dense, M) if dtype in LOW_PRECISION else (None, None)
    check(rows, want_rows, same[0])
    check(sums, want_sums, same[1])
    empty = torch.bincount(indices.reshape(-1).cpu(), minlength=M) == 0
    assert torch.all(rows.cpu()[empty] == 0) and torch.all(sums.cpu()[empty] == 0)


def test_sparse_transpose_matmul_is_deterministic_and_reuses_groups():
    N, k, M, d = 40, 8, 6, 24  # ~53 entries per latent: several block_e chunks each
    values, indices = make_code(N, k, M, torch.float32, unique=False)
    dense = randn(N, d)
    groups = tk.group_by_latent(indices, M)
    first = tk.sparse_transpose_matmul(values, indices, dense, M, groups, block_e=4, block_d=16)
    again = tk.sparse_transpose_matmul(values, indices, dense, M, groups, block_e=4, block_d=16)
    fresh = tk.sparse_transpose_matmul(values, indices, dense, M, block_e=4, block_d=16)
    for a, b, c in zip(first, again, fresh):
        assert torch.equal(a, b) and torch.equal(a, c)  # bitwise


def make_encoder(d, M, dtype):
    """(W_enc, b_enc, pre_bias) scaled so pre-activations are O(1) with both signs (ReLU matters)."""
    W_enc, b_enc, pre_bias = randn(M, d) / d**0.5, 0.3 * randn(M), 0.5 * randn(d)
    return W_enc.to(dtype), b_enc.to(dtype), pre_bias.to(dtype)


def encode(x, W_enc, b_enc, k, pre_bias=None, latent_mask=None, threshold=None, **config):
    values, indices = tk.topk_encode(x, W_enc, b_enc, k, pre_bias, latent_mask, threshold,
                                     **{**SMALL_ENCODE, **config})
    assert values.shape == indices.shape == (x.shape[0], k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    return values, indices


# (N, d, M, k, splits): 1s, k = M, k = 1, M not a multiple of the 16-latent tile, latents over
# several tiles and splits, k = 100 > 64 (padded to 128, wider than a tile), k = 256.
ENCODE_SHAPES = [
    (1, 1, 1, 1, 1),
    (7, 19, 37, 5, 1),
    (5, 8, 13, 13, 1),
    (9, 5, 50, 1, 2),
    (20, 17, 70, 7, 3),
    (3, 4, 130, 100, 2),
    (2, 3, 300, 256, 1),
]


# Each tile selected one candidate at a time, or (where the running set fits a tile) sorted and merged.
SELECTIONS = {"insert": dict(insert_limit=2**30), "sort_and_merge": dict(insert_limit=0)}


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("with_pre_bias", (False, True), ids=("no_pre_bias", "pre_bias"))
@pytest.mark.parametrize("N,d,M,k,splits", ENCODE_SHAPES)
def test_topk_encode_float32_matches_reference_exactly_in_selection(N, d, M, k, splits, with_pre_bias, selection):
    x = randn(N, d)
    W_enc, b_enc, pre_bias = make_encoder(d, M, torch.float32)
    pre_bias = pre_bias if with_pre_bias else None
    values, indices = encode(x, W_enc, b_enc, k, pre_bias, splits=splits, **SELECTIONS[selection])
    want_values, want_indices = reference.topk_encode(
        x.double(), W_enc.double(), b_enc.double(), k, pre_bias=None if pre_bias is None else pre_bias.double()
    )
    assert torch.equal(indices, want_indices)
    check(values, want_values)


def test_topk_encode_latent_mask():
    N, d, M, k = 11, 12, 90, 6
    x = randn(N, d)
    W_enc, b_enc, pre_bias = make_encoder(d, M, torch.float32)
    keep = torch.rand(M, device=DEVICE) < 0.3
    keep[:k] = True  # at least k latents compete
    values, indices = encode(x, W_enc, b_enc, k, pre_bias, keep, splits=2)
    want_values, want_indices = reference.topk_encode(
        x.double(), W_enc.double(), b_enc.double(), k, pre_bias=pre_bias.double(), latent_mask=keep
    )
    assert keep[indices].all()
    assert torch.equal(indices, want_indices)
    check(values, want_values)


def assert_masked_thresholded_encode_matches_reference(N, d, M, k, **config):
    """encode of random float32 data with a latent mask (keeping at least k latents) and thresholds:
    the reference's indices exactly, and its values."""
    x = randn(N, d)
    W_enc, b_enc, pre_bias = make_encoder(d, M, torch.float32)
    keep = torch.rand(M, device=DEVICE) < 0.8
    keep[:k] = True
    threshold = 0.3 * randn(M).abs()
    values, indices = encode(x, W_enc, b_enc, k, pre_bias, keep, threshold, **config)
    want_values, want_indices = reference.topk_encode(
        x.double(), W_enc.double(), b_enc.double(), k, pre_bias=pre_bias.double(), latent_mask=keep,
        threshold=threshold.double())
    assert torch.equal(indices, want_indices)
    check(values, want_values)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_topk_encode_wide_tiles_with_padding_slots(selection):
    """k = 40 (a running set of 64, 24 padding slots) against 128-latent tiles: the sort-and-merge path with
    padding slots, and the insertion path, over four tiles of a masked, thresholded range."""
    assert_masked_thresholded_encode_matches_reference(3, 9, 400, 40, block_m=128, splits=1, **SELECTIONS[selection])


@pytest.mark.parametrize("block_n", (16, 64), ids=("latents_x_rows", "rows_x_latents"))
def test_topk_encode_multiplies_either_way_round(block_n):
    """A row tile under 64 rows (wgmma's least M side) multiplies latents x rows and transposes the
    product; one of 64 rows multiplies rows x latents. Either way: 66 rows (a partial row block),
    100 latents in 64-latent tiles over two splits, masked and thresholded, k = 20."""
    assert_masked_thresholded_encode_matches_reference(66, 8, 100, 20, block_n=block_n, block_m=64, splits=2)


@pytest.mark.parametrize("splits", (1, 3))
def test_topk_encode_ties_go_to_the_lower_latent(splits):
    """Identical encoder rows and integer data make every pre-activation exact, so equal
    pre are equal bit for bit across tiles and splits; b_enc = i % 4 leaves the latents
    i = 3 mod 4 tied at the top."""
    N, d, M, k = 5, 6, 50, 5
    x = torch.randint(-3, 4, (N, d)).float().to(DEVICE)
    W_enc = torch.randint(-3, 4, (1, d)).float().expand(M, d).contiguous().to(DEVICE)
    b_enc = (torch.arange(M) % 4).float().to(DEVICE)
    values, indices = encode(x, W_enc, b_enc, k, splits=splits)
    assert torch.equal(indices.cpu(), torch.arange(3, 4 * k, 4).expand(N, k))
    assert torch.equal(values.cpu(), (x.cpu() @ W_enc[0].cpu() + 3).relu()[:, None].expand(N, k))


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_topk_encode_low_precision_within_twice_torch_error(dtype):
    """In bf16/fp16 near-ties may rank differently than in float64: the selection must be
    the true top-k up to twice torch's own error, and values are checked at it."""
    N, d, M, k = 9, 19, 37, 5
    x = randn(N, d, dtype=dtype)
    W_enc, b_enc, pre_bias = make_encoder(d, M, dtype)
    values, indices = encode(x, W_enc, b_enc, k, pre_bias, splits=2)
    params64 = [t.double() for t in (x, W_enc, b_enc, pre_bias)]
    pre64 = reference.pre_activations(*params64)
    torch_pre_error = max_error(reference.pre_activations(x, W_enc, b_enc, pre_bias), pre64)
    chosen = pre64.gather(-1, indices)
    assert torch.all(chosen[:, :-1] >= chosen[:, 1:] - 2 * torch_pre_error)  # decreasing, up to rounding
    assert max_error(chosen.sort(dim=-1, descending=True).values, pre64.topk(k, dim=-1).values) <= 2 * torch_pre_error
    check(values, reference.encode_at(*params64[:3], indices, pre_bias=params64[3]),
          reference.encode_at(x, W_enc, b_enc, indices, pre_bias=pre_bias))


def test_topk_encode_strided_inputs_and_empty_batch():
    N, d, M, k = 6, 10, 40, 3
    x = randn(N, 2 * d)[:, ::2]
    W_enc = (randn(d, M) / d**0.5).T  # SAELens stores W_enc as [d, M]
    b_enc = randn(M)
    values, indices = encode(x, W_enc, b_enc, k)
    want_values, want_indices = reference.topk_encode(x.double(), W_enc.double(), b_enc.double(), k)
    assert torch.equal(indices, want_indices)
    check(values, want_values)
    encode(x[:0], W_enc, b_enc, k)
