"""component_attribution against a float64 oracle of APD's calc_grad_attributions
semantics: one backward per output through a real downstream function, the
squared attributions summed over outputs (SPEC section 5)."""

import importlib

import pytest
import torch
from devices import TRITON_DEVICE
from oracle import LOW_PRECISION, assert_matches_oracle

import interpkernels
from interpkernels import reference

ops = torch.ops.interpkernels


def apd_accumulate(h, B, grad_rows):
    """APD's accumulation, one output at a time: attributions [N, C] in float64 adding,
    per output o, (sum_r h[n,c,r] (B[c,r] . grad_y[n]))^2 with grad_y = grad_rows[:, o]."""
    h, B = h.double(), B.double()
    attributions = torch.zeros(h.shape[:2], dtype=torch.float64)
    for o in range(grad_rows.shape[1]):
        attributions += torch.einsum("ncr,crd,nd->nc", h, B, grad_rows[:, o].double()).square()
    return attributions


def output_rows_by_backward(h, B, outputs, seed=1):
    """G [N, O, d] in float64, APD's way: the layer's output y = sum_{c,r} h[n,c,r] B[c,r]
    feeds a nonlinear head f: R^d -> R^O, and each output o takes one backward,
    grad_y = d f_o / d y."""
    generator = torch.Generator().manual_seed(seed)
    h, B = h.double(), B.double()
    d = B.shape[-1]
    head = torch.randn(outputs, d, generator=generator, dtype=torch.float64) / d**0.5
    y = torch.einsum("ncr,crd->nd", h, B).requires_grad_()
    out = torch.tanh(y @ head.T) + (y @ head.T).square() / 10
    rows = [torch.autograd.grad(out[:, o].sum(), y, retain_graph=True)[0] for o in range(outputs)]
    return torch.stack(rows, 1) if rows else y.new_zeros(y.shape[0], 0, d)


def make_problem(N, C, m, O, d, dtype):
    """(h, B, G) in dtype and the float64 oracle of the attributions of those (rounded) inputs."""
    h = torch.randn(N, C, m, dtype=torch.float64)
    B = torch.randn(C, m, d, dtype=torch.float64) / d**0.5
    G = output_rows_by_backward(h, B, O)
    h, B, G = h.to(dtype), B.to(dtype), G.to(dtype)
    return h, B, G, apd_accumulate(h, B, G)


# (N, C, m, O, d): the first ones take the projection path, the last two the
# gram path (d (O + C) + C m d < O C m), with 1s, primes and odd sizes.
SHAPES = [(1, 1, 1, 1, 1), (7, 13, 1, 5, 11), (5, 3, 2, 3, 17), (3, 37, 3, 1, 5), (6, 19, 1, 41, 3), (4, 11, 2, 29, 2)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_matches_apd_oracle(shape, dtype, backend):
    N, C, m, O, d = shape
    h, B, G, oracle = make_problem(N, C, m, O, d, dtype)
    U, h_arg = (B[:, 0], h[..., 0]) if m == 1 else (B, h)
    out = interpkernels.component_attribution(h_arg, U, G, backend=backend)
    assert out.dtype == dtype and out.shape == (N, C)
    torch_same_dtype = reference.component_attribution(h_arg, U, G) if dtype in LOW_PRECISION else None
    assert_matches_oracle(out, oracle, torch_same_dtype)


def test_rank_one_is_rank_m_with_m_1_and_keeps_leading_dims():
    h, B, G, oracle = make_problem(6, 9, 1, 4, 7, torch.float32)
    rank_one = interpkernels.component_attribution(h[..., 0].view(2, 3, 9), B[:, 0], G.view(2, 3, 4, 7))
    rank_m = interpkernels.component_attribution(h, B, G)
    assert rank_one.shape == (2, 3, 9)
    torch.testing.assert_close(rank_one.view(6, 9), rank_m, rtol=0, atol=0)


def test_strided_inputs():
    h, B, G, oracle = make_problem(5, 8, 2, 6, 9, torch.float32)
    h_t = h.transpose(0, 1).contiguous().transpose(0, 1)
    B_t = B.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    G_t = G.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (h_t.is_contiguous() or B_t.is_contiguous() or G_t.is_contiguous())
    assert_matches_oracle(interpkernels.component_attribution(h_t, B_t, G_t), oracle)


def test_empty_batch_and_no_outputs():
    U = torch.randn(4, 3)
    assert interpkernels.component_attribution(torch.randn(0, 4), U, torch.randn(0, 5, 3)).shape == (0, 4)
    out = interpkernels.component_attribution(torch.randn(2, 4), U, torch.randn(2, 0, 3))
    assert torch.equal(out, torch.zeros(2, 4))


def test_repeatable_run_to_run():
    """Projection path (O small) and gram path (O large) at sizes that go parallel."""
    for O, d in ((4, 64), (300, 8)):
        h, U, G = torch.randn(64, 600), torch.randn(600, d), torch.randn(64, O, d)
        first = interpkernels.component_attribution(h, U, G)
        assert torch.equal(first, interpkernels.component_attribution(h, U, G))
        torch.testing.assert_close(first, reference.component_attribution(h, U, G), rtol=2e-5, atol=0)


@pytest.mark.parametrize("m", [1, 2])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64(m, backend):
    h, B, G, _ = make_problem(3, 4, m, 5, 3, torch.float64)
    U = B[:, 0] if m == 1 else B
    h = h[..., 0] if m == 1 else h
    inputs = [t.clone().requires_grad_() for t in (h, U, G)]

    def fn(*args):
        return interpkernels.component_attribution(*args, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_backward_blocks_tokens_like_one_pass(monkeypatch):
    """The backward's token blocks change nothing but memory."""
    module = importlib.import_module("interpkernels.ops.component_attribution")

    h, B, G, _ = make_problem(7, 5, 2, 3, 4, torch.float64)
    grads = []
    for block_entries in (1 << 22, 31):
        monkeypatch.setattr(module, "_BACKWARD_BLOCK_ENTRIES", block_entries)
        inputs = [t.clone().requires_grad_() for t in (h, B, G)]
        interpkernels.component_attribution(*inputs).sum().backward()
        grads.append([t.grad for t in inputs])
    for one, blocked in zip(*grads):
        torch.testing.assert_close(blocked, one, rtol=1e-12, atol=1e-14)


def opcheck_samples():
    torch.manual_seed(0)  # runs at collection, before the seeding fixture
    for m in (1, 3):
        yield (torch.randn(4, 6, m, requires_grad=True), torch.randn(6, m, 5, requires_grad=True),
               torch.randn(4, 7, 5, requires_grad=True))


@pytest.mark.parametrize("args", list(opcheck_samples()), ids=["rank1", "rank3"])
def test_opcheck(args):
    torch.library.opcheck(ops.component_attribution.default, args)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    torch._dynamo.reset()
    h, U, G = torch.randn(2, 5, 6), torch.randn(6, 4), torch.randn(2, 5, 3, 4)

    def loss(h, U, G):
        return interpkernels.component_attribution(h, U, G).sqrt().sum()

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, U, G)]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach(), *(leaf.grad for leaf in leaves)])
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.randn(3, 4), torch.randn(4, 5, 2, 1), torch.randn(3, 2, 1)), ValueError, "U: expected shape"),
        ((torch.randn(3, 5), torch.randn(4, 2), torch.randn(3, 2, 2)), ValueError, r"h: expected shape \[..., C\]"),
        ((torch.randn(3, 4, 2), torch.randn(4, 3, 6), torch.randn(3, 2, 6)), ValueError,
         r"h: expected shape \[..., C, m\]"),
        ((torch.randn(3, 4), torch.randn(4, 2), torch.randn(2, 5, 2)), ValueError, "G: expected shape"),
        ((torch.randn(3, 4), torch.randn(4, 2), torch.randn(3, 5, 3)), ValueError, "G: expected shape"),
        ((torch.randn(3, 4), torch.randn(4, 2).double(), torch.randn(3, 5, 2)), TypeError, "U: expected dtype"),
        ((torch.randn(3, 4).int(), torch.randn(4, 2), torch.randn(3, 5, 2)), TypeError, "h: expected a"),
        ((torch.randn(3, 4), [[1.0, 2.0]] * 4, torch.randn(3, 5, 2)), TypeError, "U: expected a torch.Tensor"),
    ],
)
def test_bad_input_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        interpkernels.component_attribution(*args)


def test_op_checks_shapes_itself():
    with pytest.raises(ValueError, match="component_attribution: expected h"):
        ops.component_attribution(torch.randn(3, 4, 1), torch.randn(4, 2, 5), torch.randn(3, 2, 5))


@pytest.mark.usefixtures("triton_as_on_gpu")
@pytest.mark.parametrize("shape", [(3, 5, 1, 3, 7), (2, 19, 2, 17, 5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_apd_oracle(shape, dtype):
    N, C, m, O, d = shape
    h, B, G, oracle = make_problem(N, C, m, O, d, dtype)
    h, B, G = (t.to(TRITON_DEVICE) for t in (h, B, G))
    out = interpkernels.component_attribution(h, B, G.transpose(1, 2).contiguous().transpose(1, 2), backend="triton")
    torch_same_dtype = reference.component_attribution(h, B, G).cpu() if dtype in LOW_PRECISION else None
    assert_matches_oracle(out.cpu(), oracle, torch_same_dtype)
