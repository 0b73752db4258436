"""topk_encode against the dense reference (SPEC.md §1, §6)."""

import pytest
import torch
from oracle import ALL_DTYPES, LOW_PRECISION, assert_matches_oracle, max_error

import interpkernels
from interpkernels import reference

ops = torch.ops.interpkernels

# (leading shape, d, M, k): 1s, primes, k = M, M not a multiple of 8, 3-D
# inputs, and sizes that cross the kernel's latent tile (2048) and row tile (1024).
SHAPES = [
    ((1,), 1, 1, 1),
    ((37,), 19, 301, 7),
    ((5,), 8, 13, 13),
    ((3, 11), 16, 97, 1),
    ((3,), 5, 4500, 40),
    ((1100,), 3, 37, 5),
]


def make_encoder(d, M, dtype):
    """Weights scaled so pre-activations are O(1) with both signs (ReLU matters)."""
    W_enc = (torch.randn(M, d, dtype=torch.float64) / d**0.5).to(dtype)
    b_enc = (0.3 * torch.randn(M, dtype=torch.float64)).to(dtype)
    pre_bias = (0.5 * torch.randn(d, dtype=torch.float64)).to(dtype)
    return W_enc, b_enc, pre_bias


def encode_grads(encode, x, W_enc, b_enc, pre_bias, grad_values):
    """(values, grad_x, grad_W_enc, grad_b_enc, grad_pre_bias) from fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    values = encode(*leaves)
    values.backward(grad_values)
    return (values.detach(), *(leaf.grad for leaf in leaves))


@pytest.mark.parametrize("leading,d,M,k", SHAPES)
@pytest.mark.parametrize("dtype", (torch.float64, torch.float32), ids=str)
def test_matches_reference_exactly_in_selection(leading, d, M, k, dtype):
    x = torch.randn(*leading, d, dtype=dtype)
    W_enc, b_enc, pre_bias = make_encoder(d, M, dtype)
    grad_values = torch.randn(*leading, k, dtype=dtype)

    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k, pre_bias=pre_bias)
    want_values, want_indices = reference.topk_encode(
        x.double(), W_enc.double(), b_enc.double(), k, pre_bias=pre_bias.double()
    )
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert torch.equal(indices, want_indices)
    assert_matches_oracle(values, want_values)

    ours = encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                        x, W_enc, b_enc, pre_bias, grad_values)
    oracle = encode_grads(lambda *a: reference.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                          *(t.double() for t in (x, W_enc, b_enc, pre_bias, grad_values)))
    for got, want in zip(ours, oracle):
        assert_matches_oracle(got, want)


@pytest.mark.parametrize("leading,d,M,k", SHAPES[1:5])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_torch_error(leading, d, M, k, dtype):
    """In bf16/fp16, near-ties may legitimately rank differently than in
    float64, so the selection is checked for validity (its float64
    pre-activations are the true top-k up to twice torch's own error) and
    values and gradients are compared at the kernel's selection."""
    x = torch.randn(*leading, d, dtype=dtype)
    W_enc, b_enc, pre_bias = make_encoder(d, M, dtype)
    grad_values = torch.randn(*leading, k, dtype=dtype)
    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k, pre_bias=pre_bias)

    params64 = [t.double() for t in (x, W_enc, b_enc, pre_bias)]
    pre64 = reference.pre_activations(*params64[:3], params64[3])
    torch_pre_error = max_error(reference.pre_activations(x, W_enc, b_enc, pre_bias), pre64)
    chosen = pre64.gather(-1, indices).sort(dim=-1, descending=True).values
    best = pre64.topk(k, dim=-1).values
    assert max_error(chosen, best) <= 2 * torch_pre_error

    def at_selection(*a):
        return reference.encode_at(*a[:3], indices, pre_bias=a[3])

    ours = encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                        x, W_enc, b_enc, pre_bias, grad_values)
    oracle = encode_grads(at_selection, *params64, grad_values.double())
    torch_same_dtype = encode_grads(at_selection, x, W_enc, b_enc, pre_bias, grad_values)
    for got, want, torch_result in zip(ours, oracle, torch_same_dtype):
        assert got.dtype == dtype
        assert_matches_oracle(got, want, torch_result)


def test_ties_go_to_the_lower_latent_index():
    d, M = 6, 40
    W_enc = torch.randn(1, d).expand(M, d).contiguous()  # every latent identical
    b_enc = torch.full((M,), 0.25)
    x = torch.randn(9, d)
    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, 5)
    assert torch.equal(indices, torch.arange(5).expand(9, 5))
    # A tie across the latent tile boundary (2048) as well.
    W_wide = torch.randn(1, d).expand(4100, d).contiguous()
    _, indices = interpkernels.topk_encode(x, W_wide, torch.zeros(4100), 3)
    assert torch.equal(indices, torch.arange(3).expand(9, 3))


def test_latent_mask_restricts_competition_and_gradients_reach_the_encoder():
    """AuxK: top-k over dead latents only, with gradients into W_enc and b_enc
    (EleutherAI sparsify drops these; SPEC.md §1)."""
    d, M, k = 12, 300, 6
    x = torch.randn(25, d, dtype=torch.float64)
    W_enc, b_enc, pre_bias = make_encoder(d, M, torch.float64)
    dead = torch.rand(M) < 0.2
    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k, pre_bias=pre_bias, latent_mask=dead)
    want_values, want_indices = reference.topk_encode(x, W_enc, b_enc, k, pre_bias=pre_bias, latent_mask=dead)
    assert dead[indices].all()
    assert torch.equal(indices, want_indices)
    assert_matches_oracle(values, want_values)

    W = W_enc.clone().requires_grad_()
    b = b_enc.clone().requires_grad_()
    interpkernels.topk_encode(x, W, b, k, pre_bias=pre_bias, latent_mask=dead)[0].square().sum().backward()
    assert W.grad[~dead].abs().max() == 0 and b.grad[~dead].abs().max() == 0
    assert W.grad[dead].abs().max() > 0 and b.grad[dead].abs().max() > 0
    assert torch.autograd.gradcheck(
        lambda W, b: interpkernels.topk_encode(x[:4], W, b, k, latent_mask=dead)[0],
        (W_enc.clone().requires_grad_(), b_enc.clone().requires_grad_()),
    )


def test_non_contiguous_inputs():
    d, M, k = 24, 200, 9
    x = torch.randn(20, 2 * d)[:, ::2]
    W_enc = (torch.randn(d, M) / d**0.5).T  # SAELens stores W_enc as [d, M]
    b_enc = torch.randn(2 * M)[::2]
    pre_bias = torch.randn(d, 3)[:, 1]
    assert not any(t.is_contiguous() for t in (x, W_enc, b_enc, pre_bias))
    grad_values = torch.randn(20, k)
    ours = encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                        x, W_enc, b_enc, pre_bias, grad_values)
    oracle = encode_grads(lambda *a: reference.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                          *(t.double() for t in (x, W_enc, b_enc, pre_bias, grad_values)))
    for got, want in zip(ours, oracle):
        assert_matches_oracle(got, want)


def test_fp64_gradcheck_and_gradgradcheck():
    d, M, k = 5, 17, 4
    inputs = [t.requires_grad_() for t in (torch.randn(3, 2, d, dtype=torch.float64), *make_encoder(d, M, torch.float64))]

    def encode(x, W, b, pre_bias):
        return interpkernels.topk_encode(x, W, b, k, pre_bias=pre_bias)[0]

    assert torch.autograd.gradcheck(encode, inputs)
    assert torch.autograd.gradgradcheck(encode, inputs)


def test_empty_batch_and_autocast():
    W_enc, b_enc, _ = make_encoder(8, 30, torch.float32)
    values, indices = interpkernels.topk_encode(torch.empty(0, 8), W_enc, b_enc, 4)
    assert values.shape == indices.shape == (0, 4)
    x = torch.randn(10, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        values, indices = interpkernels.topk_encode(x, W_enc, b_enc, 4)
    assert values.dtype == torch.bfloat16
    assert torch.equal(indices, reference.topk_encode(x.bfloat16().double(), W_enc.bfloat16().double(),
                                                      b_enc.bfloat16().double(), 4)[1])


def opcheck_samples():
    torch.manual_seed(0)  # runs at collection, before the seeding fixture
    W_enc, b_enc, pre_bias = make_encoder(6, 50, torch.float32)
    x = torch.randn(7, 6)
    yield (x, W_enc, b_enc, 5, None, None, None)
    yield (x.requires_grad_(), W_enc.requires_grad_(), b_enc.requires_grad_(), 3, pre_bias.requires_grad_(), None,
           None)
    yield (x, W_enc, b_enc, 2, pre_bias, torch.arange(50) % 3 == 0, None)
    yield (x, W_enc, b_enc, 4, pre_bias, None, 0.1 * torch.rand(50))


@pytest.mark.parametrize("args", list(opcheck_samples()))
def test_opcheck(args):
    torch.library.opcheck(ops.topk_encode.default, args)


def bad_inputs():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=generator)
    W_enc = torch.randn(10, 6, generator=generator)
    b_enc = torch.randn(10, generator=generator)
    meta = torch.device("meta")
    yield "k: expected 1 <= k <= M = 10, got 0", ValueError, (x, W_enc, b_enc, 0), {}
    yield "k: expected 1 <= k <= M = 10, got 11", ValueError, (x, W_enc, b_enc, 11), {}
    yield "k: expected an int, got float", TypeError, (x, W_enc, b_enc, 2.0), {}
    yield "W_enc: expected shape [M, d] with d = 6", ValueError, (x, W_enc[:, :5], b_enc, 2), {}
    yield "b_enc: expected shape [M] = [10]", ValueError, (x, W_enc, b_enc[:9], 2), {}
    yield "pre_bias: expected shape [d] = [6]", ValueError, (x, W_enc, b_enc, 2), {"pre_bias": torch.zeros(5)}
    yield "W_enc: expected dtype float32 (the dtype of x)", TypeError, (x, W_enc.half(), b_enc, 2), {}
    yield "x: expected a float64, float32, bfloat16 or float16 tensor", TypeError, (x.long(), W_enc, b_enc, 2), {}
    yield "b_enc: expected a tensor on cpu (the device of x)", ValueError, (x, W_enc, b_enc.to(meta), 2), {}
    yield "latent_mask: expected a bool tensor of shape [10]", TypeError, (x, W_enc, b_enc, 2), {
        "latent_mask": torch.ones(10)}
    yield "latent_mask: expected shape [M] = [10]", ValueError, (x, W_enc, b_enc, 2), {
        "latent_mask": torch.ones(9, dtype=torch.bool)}
    yield "k: expected at most the 3 latents latent_mask keeps in, got 4", ValueError, (x, W_enc, b_enc, 4), {
        "latent_mask": torch.arange(10) < 3}


@pytest.mark.parametrize("message,error,args,kwargs", list(bad_inputs()),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_naming_the_argument(message, error, args, kwargs):
    with pytest.raises(error) as raised:
        interpkernels.topk_encode(*args, **kwargs)
    assert message in str(raised.value)
