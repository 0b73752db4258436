"""sparse_decode and its gradient products against the dense reference (docs/OPS.md)."""

import functools

import pytest
import torch
from devices import TRITON_DEVICE
from oracle import ALL_DTYPES, LOW_PRECISION, assert_matches_oracle

import interpkernels
from interpkernels import reference

ops = torch.ops.interpkernels

# (leading shape, k, M, d): primes, k = 1, k = M, M and d not multiples of 8, 3-D codes.
SHAPES = [
    ((1,), 1, 1, 1),
    ((37,), 7, 301, 19),
    ((13,), 13, 13, 5),
    ((4, 9), 3, 50, 33),
    ((64,), 32, 1000, 129),
]


def make_code(leading, k, M, dtype, *, unique=True):
    """Random values (positive and negative, never zero) and indices; unique
    indices per row unless asked, as a TopK code has them."""
    values = torch.randn(*leading, k, dtype=torch.float64)
    values = (values + values.sign() * 0.1).to(dtype)
    if unique:
        indices = torch.rand(*leading, M).argsort(dim=-1)[..., :k]
    else:
        indices = torch.randint(0, M, (*leading, k))
    return values, indices


def decode_grads(fn, values, indices, W_dec, bias, grad_out):
    """(out, grad_values, grad_W_dec, grad_bias) of fn, from fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (values, W_dec, bias)]
    out = fn(leaves[0], indices, leaves[1], leaves[2])
    out.backward(grad_out)
    return (out.detach(), *(leaf.grad for leaf in leaves))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("leading,k,M,d", SHAPES)
def test_values_and_gradients_match_reference(leading, k, M, d, dtype, target):
    target.skip_unless_runs(dtype)
    values, indices = make_code(leading, k, M, dtype)
    W_dec = torch.randn(M, d, dtype=dtype)
    bias = torch.randn(d, dtype=dtype)
    grad_out = torch.randn(*leading, d, dtype=dtype)

    ours = decode_grads(functools.partial(interpkernels.sparse_decode, backend=target.backend),
                        *target.put(values, indices, W_dec, bias, grad_out))
    oracle = decode_grads(
        reference.sparse_decode, *(t.double() for t in (values,)), indices, W_dec.double(), bias.double(),
        grad_out.double(),
    )
    torch_same_dtype = (
        decode_grads(reference.sparse_decode, values, indices, W_dec, bias, grad_out) if dtype in LOW_PRECISION else
        (None,) * 4
    )
    for name, got, want, torch_result in zip(("out", "grad_values", "grad_W_dec", "grad_bias"), ours, oracle,
                                               torch_same_dtype):
        assert got.dtype == dtype, name
        assert_matches_oracle(got, want, torch_result)


def test_repeated_indices_add_up():
    values, indices = make_code((20,), 6, 4, torch.float64, unique=False)
    W_dec = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(
        interpkernels.sparse_decode(values, indices, W_dec), reference.sparse_decode(values, indices, W_dec)
    )


def test_non_contiguous_inputs_and_int32_indices(target):
    M, d = 97, 24
    values_wide, indices_wide = target.put(*make_code((30,), 10, M, torch.float32))
    values, indices = values_wide[:, ::2], indices_wide.int()[:, ::2]  # strided views
    W_dec = target.put(torch.randn(d, M)).T  # a transposed weight, as dictionary_learning stores it
    bias = target.put(torch.randn(2 * d))[::2]
    assert not (values.is_contiguous() or indices.is_contiguous() or W_dec.is_contiguous() or bias.is_contiguous())
    grad_out = target.put(torch.randn(30, d))
    ours = decode_grads(functools.partial(interpkernels.sparse_decode, backend=target.backend),
                        values, indices, W_dec, bias, grad_out)
    oracle = decode_grads(reference.sparse_decode, *(t.cpu() for t in (values.double(), indices.long(), W_dec.double(),
                                                                        bias.double(), grad_out.double())))
    for got, want in zip(ours, oracle):
        assert_matches_oracle(got, want)


def test_empty_batch():
    W_dec = torch.randn(10, 4)
    out = interpkernels.sparse_decode(torch.empty(0, 3), torch.empty(0, 3, dtype=torch.long), W_dec, torch.ones(4))
    assert out.shape == (0, 4)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("leading", [(), (6,), (2, 3)], ids=str)
def test_empty_code_decodes_to_the_bias_with_gradients(leading, backend):
    """k = 0, a code with no active latent: the output is the bias (zeros
    without one), W_dec gets a zero gradient and the bias one per row."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    if backend == "triton":
        pytest.importorskip("triton")
    M, d = 10, 4
    values, indices = make_code(leading, 0, M, torch.float32)
    W_dec, bias, grad_out = torch.randn(M, d), torch.randn(d), torch.randn(*leading, d)
    out, grad_values, grad_W_dec, grad_bias = decode_grads(
        lambda *args: interpkernels.sparse_decode(*args, backend=backend),
        *(t.to(device) for t in (values, indices, W_dec, bias, grad_out)))
    torch.testing.assert_close(out.cpu(), bias.expand(*leading, d))
    assert grad_values.shape == (*leading, 0)
    torch.testing.assert_close(grad_W_dec.cpu(), torch.zeros(M, d))
    torch.testing.assert_close(grad_bias.cpu(), grad_out.reshape(-1, d).sum(0))
    no_bias = interpkernels.sparse_decode(values.to(device), indices.to(device), W_dec.to(device), backend=backend)
    torch.testing.assert_close(no_bias.cpu(), torch.zeros(*leading, d))


def test_fp64_gradcheck_and_gradgradcheck(cpu_isa):
    values, indices = make_code((6,), 3, 11, torch.float64)
    inputs = (values.requires_grad_(), torch.randn(11, 5, dtype=torch.float64, requires_grad=True),
              torch.randn(5, dtype=torch.float64, requires_grad=True))

    def decode(v, W, b):
        return interpkernels.sparse_decode(v, indices, W, b)

    assert torch.autograd.gradcheck(decode, inputs)
    assert torch.autograd.gradgradcheck(decode, inputs)


def test_gradient_products_gradcheck(cpu_isa):
    """gathered_dot and sparse_transpose_matmul are differentiable too, so
    double backward of every op runs on the kernels."""
    N, k, M, d = 5, 3, 9, 4
    _, indices = make_code((N,), k, M, torch.float64, unique=False)
    dense = torch.randn(N, d, dtype=torch.float64, requires_grad=True)
    W = torch.randn(M, d, dtype=torch.float64, requires_grad=True)
    values = torch.randn(N, k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.gathered_dot(a, indices, b), (dense, W))
    assert torch.autograd.gradcheck(lambda a, b: ops.sparse_transpose_matmul(a, indices, b, M), (values, dense))
    torch.testing.assert_close(ops.gathered_dot(dense, indices, W), reference.gathered_dot(dense, indices, W))
    for got, want in zip(ops.sparse_transpose_matmul(values, indices, dense, M),
                         reference.sparse_transpose_matmul(values, indices, dense, M)):
        torch.testing.assert_close(got, want)


def test_weight_gradient_is_deterministic_across_thread_counts():
    values, indices = make_code((500,), 16, 64, torch.float32, unique=False)
    dense = torch.randn(500, 40)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, max(threads, 2), max(threads, 2)):
            torch.set_num_threads(count)
            runs.append(ops.sparse_transpose_matmul(values, indices, dense, 64))
    finally:
        torch.set_num_threads(threads)
    for rows, sums in runs[1:]:
        assert torch.equal(rows, runs[0][0]) and torch.equal(sums, runs[0][1])


def opcheck_samples():
    torch.manual_seed(0)  # runs at collection, before the seeding fixture
    values, indices = make_code((7,), 3, 20, torch.float32)
    W_dec = torch.randn(20, 6)
    grouping = ops.latent_grouping(indices, 20)
    yield ops.latent_grouping.default, (indices, 20)
    yield ops.grouped_transpose_matmul.default, (values.clone().requires_grad_(), indices,
                                                  torch.randn(7, 6, requires_grad=True), grouping)
    yield ops.sparse_decode.default, (values, indices, W_dec, torch.randn(6))
    yield ops.sparse_decode.default, (values.requires_grad_(), indices, W_dec.requires_grad_(), None)
    yield ops.gathered_dot.default, (torch.randn(7, 6, requires_grad=True), indices, W_dec)
    yield ops.sparse_transpose_matmul.default, (values, indices, torch.randn(7, 6, requires_grad=True), 20)


@pytest.mark.parametrize("op,args", list(opcheck_samples()), ids=lambda x: getattr(x, "__name__", ""))
def test_opcheck(op, args, target):
    torch.library.opcheck(target.op(op.name().split("::")[1]), target.put_args(args))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_bitwise_deterministic_run_to_run(dtype, target):
    """Repeated latents make the weight gradient a reduction with many terms per row."""
    values, indices = make_code((700,), 24, 50, dtype, unique=False)
    inputs = target.put(values, indices, torch.randn(50, 70, dtype=dtype), torch.randn(70, dtype=dtype),
                        torch.randn(700, 70, dtype=dtype))
    decode = functools.partial(interpkernels.sparse_decode, backend=target.backend)
    runs = [decode_grads(decode, *inputs) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_grouping_is_the_stable_csr_and_grouped_products_match(target):
    values, indices = make_code((40,), 6, 23, torch.float32, unique=False)
    dense = torch.randn(40, 9)
    values, indices, dense = target.put(values, indices, dense)
    grouping = target.op("latent_grouping")(indices, 23).cpu()
    offsets, order = grouping[:24], grouping[24:]
    flat = indices.reshape(-1).cpu()
    assert torch.equal(offsets, torch.searchsorted(flat.sort().values, torch.arange(24)))
    assert torch.equal(order, flat.sort(stable=True).indices)
    grouped = target.op("grouped_transpose_matmul")(values, indices, dense, grouping.to(target.device))
    for got, want in zip(grouped, target.op("sparse_transpose_matmul")(values, indices, dense, 23)):
        assert torch.equal(got, want)


def test_one_sae_step_groups_each_code_once():
    """The decoder's and the encoder's weight gradients share the code's
    grouping; AuxK's code gets its own."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from interpkernels.nn import TopKSAE

    class CountGroupings(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += func.name() in ("interpkernels::latent_grouping", "interpkernels::sparse_transpose_matmul")
            return func(*args, **(kwargs or {}))

    module = TopKSAE(12, 64, 4, k_aux=6, seed=0)
    x = torch.randn(30, 12)
    for dead_mask, groupings in ((None, 1), (torch.arange(64) % 3 == 0, 2)):
        out = module(x, dead_mask=dead_mask)
        with CountGroupings() as counter:
            (out.fvu + out.auxk_loss).backward()
        assert counter.count == groupings
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
        module.zero_grad()


def test_autocast_runs_in_the_autocast_dtype():
    values, indices = make_code((8,), 4, 30, torch.float32)
    W_dec = torch.randn(30, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = interpkernels.sparse_decode(values, indices, W_dec)
    assert out.dtype == torch.bfloat16
    assert_matches_oracle(
        out, reference.sparse_decode(values.bfloat16().double(), indices, W_dec.bfloat16().double()),
        reference.sparse_decode(values.bfloat16(), indices, W_dec.bfloat16()),
    )


def bad_inputs():
    values = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    indices = torch.arange(12).remainder(10).view(4, 3)
    W_dec = torch.randn(10, 5)
    meta = torch.device("meta")
    yield "indices: expected int64 or int32", TypeError, (values, indices.float(), W_dec)
    yield "indices: expected int64 or int32 tensor of shape [4, 3]", ValueError, (values, indices[:, :2], W_dec)
    yield "indices: expected every index in [0, 10), got values from 0 to 10", IndexError, (
        values, torch.where(indices == indices.max(), 10, indices), W_dec)
    yield "indices: expected every index in [0, 10), got values from -1", IndexError, (
        values, torch.where(indices == indices.min(), -1, indices), W_dec)
    yield "W_dec: expected shape [M, d]", ValueError, (values, indices, W_dec[0])
    yield "W_dec: expected dtype float32 (the dtype of values)", TypeError, (values, indices, W_dec.double())
    yield "W_dec: expected a tensor on cpu (the device of values)", ValueError, (values, indices, W_dec.to(meta))
    yield "bias: expected shape [d] = [5]", ValueError, (values, indices, W_dec, torch.zeros(4))
    yield "values: expected a float64, float32, bfloat16 or float16 tensor", TypeError, (indices, indices, W_dec)
    yield "values: expected a torch.Tensor", TypeError, ([1.0], indices, W_dec)


@pytest.mark.parametrize("message,error,args", list(bad_inputs()), ids=lambda x: x if isinstance(x, str) else "")
def test_bad_inputs_raise_naming_the_argument(message, error, args):
    with pytest.raises(error) as raised:
        interpkernels.sparse_decode(*args)
    assert message in str(raised.value)


@pytest.mark.parametrize("bad_index", [-1, 10])
def test_backend_torch_raises_the_kernels_index_error(bad_index):
    """The dense reference reports an index out of [0, M) as the kernels do."""
    values, W_dec = torch.randn(4, 3), torch.randn(10, 5)
    indices = torch.arange(12).remainder(10).view(4, 3)
    indices[2, 1] = bad_index
    messages = []
    for backend in ("cpu", "torch"):
        with pytest.raises(IndexError) as raised:
            interpkernels.sparse_decode(values, indices, W_dec, backend=backend)
        messages.append(str(raised.value))
    assert messages[0] == messages[1]
