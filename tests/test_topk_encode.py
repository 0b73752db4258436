"""topk_encode against the dense reference (docs/OPS.md)."""

import pytest
import torch
from devices import backends_and_devices
from oracle import LOW_PRECISION, assert_matches_oracle, max_error

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
def test_matches_reference_exactly_in_selection(leading, d, M, k, dtype, target):
    target.skip_unless_runs(dtype)
    x = torch.randn(*leading, d, dtype=dtype)
    W_enc, b_enc, pre_bias = make_encoder(d, M, dtype)
    grad_values = torch.randn(*leading, k, dtype=dtype)

    values, indices = interpkernels.topk_encode(*target.put(x, W_enc, b_enc), k, pre_bias=target.put(pre_bias),
                                                backend=target.backend)
    want_values, want_indices = reference.topk_encode(
        x.double(), W_enc.double(), b_enc.double(), k, pre_bias=pre_bias.double()
    )
    assert indices.dtype == torch.int64 and values.dtype == dtype
    assert torch.equal(indices.cpu(), want_indices)
    assert_matches_oracle(values, want_values)

    ours = encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3], backend=target.backend)[0],
                        *target.put(x, W_enc, b_enc, pre_bias, grad_values))
    oracle = encode_grads(lambda *a: reference.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                          *(t.double() for t in (x, W_enc, b_enc, pre_bias, grad_values)))
    for got, want in zip(ours, oracle):
        assert_matches_oracle(got, want)


@pytest.mark.parametrize("leading,d,M,k", SHAPES[1:5])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_low_precision_within_twice_torch_error(leading, d, M, k, dtype, target):
    """In bf16/fp16, near-ties may legitimately rank differently than in
    float64, so the selection is checked for validity (its float64
    pre-activations are the true top-k up to twice torch's own error) and
    values and gradients are compared at the kernel's selection."""
    x = torch.randn(*leading, d, dtype=dtype)
    W_enc, b_enc, pre_bias = make_encoder(d, M, dtype)
    grad_values = torch.randn(*leading, k, dtype=dtype)
    values, indices = interpkernels.topk_encode(*target.put(x, W_enc, b_enc), k, pre_bias=target.put(pre_bias),
                                                backend=target.backend)
    indices = indices.cpu()

    params64 = [t.double() for t in (x, W_enc, b_enc, pre_bias)]
    pre64 = reference.pre_activations(*params64[:3], params64[3])
    torch_pre_error = max_error(reference.pre_activations(x, W_enc, b_enc, pre_bias), pre64)
    chosen = pre64.gather(-1, indices).sort(dim=-1, descending=True).values
    best = pre64.topk(k, dim=-1).values
    assert max_error(chosen, best) <= 2 * torch_pre_error

    def at_selection(*a):
        return reference.encode_at(*a[:3], indices, pre_bias=a[3])

    ours = encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3], backend=target.backend)[0],
                        *target.put(x, W_enc, b_enc, pre_bias, grad_values))
    oracle = encode_grads(at_selection, *params64, grad_values.double())
    torch_same_dtype = encode_grads(at_selection, x, W_enc, b_enc, pre_bias, grad_values)
    for got, want, torch_result in zip(ours, oracle, torch_same_dtype):
        assert got.dtype == dtype
        assert_matches_oracle(got, want, torch_result)


def test_ties_go_to_the_lower_latent_index(target):
    d, M = 6, 40
    W_enc = torch.randn(1, d).expand(M, d).contiguous()  # every latent identical
    b_enc = torch.full((M,), 0.25)
    x = torch.randn(9, d)
    values, indices = interpkernels.topk_encode(*target.put(x, W_enc, b_enc), 5, backend=target.backend)
    assert torch.equal(indices.cpu(), torch.arange(5).expand(9, 5))
    # A tie across the latent tile boundary (2048) as well.
    W_wide = torch.randn(1, d).expand(4100, d).contiguous()
    _, indices = interpkernels.topk_encode(*target.put(x, W_wide, torch.zeros(4100)), 3, backend=target.backend)
    assert torch.equal(indices.cpu(), torch.arange(3).expand(9, 3))


def test_ties_break_to_the_lower_latent_wherever_the_latents_sit(target):
    """Copies of one latent among random others, in both GEMM tiles (2048
    latents each) and in the last, partial one: each copy's pre-activation must
    be the same bits, so the lowest copies win, whatever the CPU."""
    d, M = 37, 4500
    x = torch.randn(9, d)
    W_enc, b_enc = torch.randn(M, d) / d**0.5, 0.1 * torch.randn(M)
    copies = torch.tensor([4098, 5, 2047, 4096, 2048, 4097])
    W_enc[copies] = torch.randn(d)
    b_enc[copies] = 10.0  # above every other latent
    values, indices = interpkernels.topk_encode(*target.put(x, W_enc, b_enc), 4, backend=target.backend)
    assert torch.equal(indices.cpu(), torch.tensor([5, 2047, 2048, 4096]).expand(9, 4))
    assert torch.equal(values, values[:, :1].expand(9, 4))


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("with_threshold", (False, True), ids=("topk", "threshold"))
def test_screening_never_changes_the_selection(dtype, with_threshold, cpu_isa):
    """The CPU kernel screens latents with the GEMM and decides on the canonical
    dot. With k = M nothing is screened out, so the first k of that ranking are
    the exact answer. Coarse integer data makes exact ties and near-ties
    everywhere, across latent tiles (2048) and row blocks (1024 rows)."""
    N, d, M, k = 1030, 12, 2100, 7
    x = torch.randint(-4, 5, (N, d)).to(dtype) / 4
    W_enc = torch.randint(-3, 4, (M, d)).to(dtype) / 3
    W_enc[::7] += (1e-3 * torch.randn(M, d)[::7]).to(dtype)  # near-ties as well as exact ones
    b_enc = torch.randint(-2, 3, (M,)).to(dtype) / 8
    threshold = (torch.rand(M) * 2).to(dtype) if with_threshold else None
    values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k, threshold=threshold)
    all_values, all_indices = interpkernels.topk_encode(x, W_enc, b_enc, M, threshold=threshold)
    assert torch.equal(indices, all_indices[:, :k])
    assert torch.equal(values, all_values[:, :k])


def random_encoder_problem(seed: int):
    """A random topk_encode problem with the special values screening must
    survive: coarse integer data (ties), huge and tiny scales, NaN weights,
    -inf biases (AuxK's masking) and +inf ones, inf inputs, masks, thresholds."""
    generator = torch.Generator().manual_seed(seed)

    def pick(*choices):
        return choices[int(torch.randint(len(choices), (), generator=generator))]

    def chance(p):
        return bool(torch.rand((), generator=generator) < p)

    N, d, M, dtype = pick(1, 3, 50), pick(0, 1, 5, 17, 40), pick(1, 7, 300, 2049), pick(torch.float32, torch.float64)
    k = int(torch.randint(1, min(M, 70) + 1, (), generator=generator))
    if chance(0.5):
        x, W, b = (torch.randint(-3, 4, shape, generator=generator).to(dtype) for shape in ((N, d), (M, d), (M,)))
    else:
        x, W, b = (torch.randn(shape, generator=generator, dtype=dtype) for shape in ((N, d), (M, d), (M,)))
    x = x * pick(1.0, 1e-30, 1e30)
    mask = torch.rand(M, generator=generator) < 0.7 if chance(0.3) else None
    if mask is not None:
        mask[:k] = True
    threshold = (2 * torch.rand(M, generator=generator)).to(dtype) if chance(0.3) else None
    if d > 0 and chance(0.3):
        W[int(torch.randint(M, (), generator=generator)), int(torch.randint(d, (), generator=generator))] = float("nan")
    if chance(0.3):
        b[int(torch.randint(M, (), generator=generator))] = float("-inf")
    if chance(0.2):
        b[int(torch.randint(M, (), generator=generator))] = float("inf")
    if d > 0 and chance(0.2):
        x[int(torch.randint(N, (), generator=generator)), int(torch.randint(d, (), generator=generator))] = float("inf")
    return x, W, b, k, mask, threshold


@pytest.mark.parametrize("seed", range(24))
def test_screening_matches_the_exhaustive_ranking_with_special_values(seed):
    """k = all kept latents scores every latent canonically: the first k of that
    ranking are the answer, bit for bit, whatever screening ruled out."""
    x, W, b, k, mask, threshold = random_encoder_problem(seed)
    kept = W.shape[0] if mask is None else int(mask.sum())
    values, indices = interpkernels.topk_encode(x, W, b, k, latent_mask=mask, threshold=threshold)
    all_values, all_indices = interpkernels.topk_encode(x, W, b, kept, latent_mask=mask, threshold=threshold)
    assert torch.equal(indices, all_indices[:, :k])
    assert torch.equal(values.view(torch.uint8), all_values[:, :k].contiguous().view(torch.uint8))


@pytest.mark.parametrize("backend,device", backends_and_devices())
def test_nan_ranks_first_and_stays_nan(backend, device):
    """torch.topk's rule on every backend: a NaN pre-activation ranks above every
    number, ties among NaN to the lower latent, and its value stays NaN (never
    hidden: a diverged model must look diverged)."""
    d, M, k = 8, 60, 4
    x = torch.randn(5, d)
    W_enc, b_enc, _ = make_encoder(d, M, torch.float32)
    W_enc[[41, 17], 3] = float("nan")
    x[4, 0] = float("nan")  # every latent of row 4 is NaN
    values, indices = interpkernels.topk_encode(x.to(device), W_enc.to(device), b_enc.to(device), k, backend=backend)
    values, indices = values.cpu(), indices.cpu()
    if backend == "torch":  # torch.topk does not promise an order among NaN
        indices[:, :2] = indices[:, :2].sort(dim=-1).values
    assert torch.equal(indices[:4, :2], torch.tensor([17, 41]).expand(4, 2))
    assert values[:4, :2].isnan().all() and not values[:4, 2:].isnan().any()
    want_values, want_indices = reference.topk_encode(x[:4].double(), W_enc.double(), b_enc.double(), k)
    assert torch.equal(indices[:4, 2:], want_indices[:, 2:])
    assert_matches_oracle(values[:4, 2:], want_values[:, 2:])
    assert values[4].isnan().all()
    if backend != "torch":
        assert torch.equal(indices[4], torch.arange(k))


@pytest.mark.parametrize("backend,device", backends_and_devices())
def test_threshold_ranks_latents_above_their_own_threshold_first(backend, device):
    # The JumpReLU case: latent 0 has the larger pre but is below its threshold.
    values, indices = interpkernels.topk_encode(torch.tensor([[5.0, 3.0]], device=device), torch.eye(2, device=device),
                                                torch.zeros(2, device=device), 1,
                                                threshold=torch.tensor([10.0, 1.0], device=device), backend=backend)
    assert indices.tolist() == [[1]] and values.tolist() == [[3.0]]

    d, M, k = 10, 90, 6
    x = torch.randn(40, d) * torch.linspace(0.1, 4, 40)[:, None]  # from rows with few latents above to full rows
    W_enc, b_enc, pre_bias = make_encoder(d, M, torch.float32)
    threshold = 1 + torch.rand(M)
    ours = interpkernels.topk_encode(*(t.to(device) for t in (x, W_enc, b_enc)), k, pre_bias=pre_bias.to(device),
                                     threshold=threshold.to(device), backend=backend)
    values, indices = (t.cpu() for t in ours)
    want_values, want_indices = reference.topk_encode(x.double(), W_enc.double(), b_enc.double(), k,
                                                      pre_bias=pre_bias.double(), threshold=threshold.double())
    assert torch.equal(indices, want_indices)
    assert_matches_oracle(values, want_values)
    above = values > threshold[indices]
    assert above.all(dim=-1).any() and not above.all(dim=-1).all()
    # Latents above threshold come first in every row.
    assert torch.equal(above, above.sort(dim=-1, descending=True, stable=True).values)


def test_no_width_means_the_bias_alone(cpu_isa):
    values, indices = interpkernels.topk_encode(torch.empty(3, 0), torch.empty(5, 0),
                                                torch.tensor([0.5, -1.0, 2.0, 1.0, 0.0]), 2)
    assert indices.tolist() == [[2, 3]] * 3 and values.tolist() == [[2.0, 1.0]] * 3


def test_latent_mask_restricts_competition_and_gradients_reach_the_encoder():
    """AuxK: top-k over dead latents only, with gradients into W_enc and b_enc
    (EleutherAI sparsify drops these; docs/OPS.md)."""
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


def test_non_contiguous_inputs(target):
    d, M, k = 24, 200, 9
    x = target.put(torch.randn(20, 2 * d))[:, ::2]
    W_enc = target.put(torch.randn(d, M) / d**0.5).T  # SAELens stores W_enc as [d, M]
    b_enc = target.put(torch.randn(2 * M))[::2]
    pre_bias = target.put(torch.randn(d, 3))[:, 1]
    assert not any(t.is_contiguous() for t in (x, W_enc, b_enc, pre_bias))
    grad_values = target.put(torch.randn(20, k))
    ours = encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3], backend=target.backend)[0],
                        x, W_enc, b_enc, pre_bias, grad_values)
    oracle = encode_grads(lambda *a: reference.topk_encode(*a[:3], k, pre_bias=a[3])[0],
                          *(t.double().cpu() for t in (x, W_enc, b_enc, pre_bias, grad_values)))
    for got, want in zip(ours, oracle):
        assert_matches_oracle(got, want)


def test_fp64_gradcheck_and_gradgradcheck(cpu_isa):
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
def test_opcheck(args, target):
    torch.library.opcheck(target.op("topk_encode"), target.put_args(args))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bitwise_deterministic_run_to_run(dtype, target):
    d, M, k = 40, 3000, 33
    x, grad_values = torch.randn(300, d, dtype=dtype), torch.randn(300, k, dtype=dtype)
    params = target.put(x, *make_encoder(d, M, dtype), grad_values)
    runs = [encode_grads(lambda *a: interpkernels.topk_encode(*a[:3], k, pre_bias=a[3], backend=target.backend)[0],
                         *params) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


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
    yield "threshold: expected shape [M] = [10]", ValueError, (x, W_enc, b_enc, 2), {"threshold": torch.ones(9)}
    yield "threshold: expected a float64, float32", TypeError, (x, W_enc, b_enc, 2), {
        "threshold": torch.ones(10, dtype=torch.long)}


@pytest.mark.parametrize("message,error,args,kwargs", list(bad_inputs()),
                         ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_naming_the_argument(message, error, args, kwargs):
    with pytest.raises(error) as raised:
        interpkernels.topk_encode(*args, **kwargs)
    assert message in str(raised.value)
