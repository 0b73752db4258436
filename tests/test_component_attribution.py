"""component_attribution against a float64 oracle written from APD's own code,
ApolloResearch/apd spd/utils.py::calc_grad_attributions (commit 4e29d43, lines
159-231): per output o, one backward of target_out[..., o].sum() to every
decomposed layer's output (the rows G_l[:, o]); the layers' terms
grad_l . component_acts_l added up, then squared, and summed over outputs
(SPEC section 5). A component spans every layer, so its layers add inside the
square."""

import importlib

import pytest
import torch
from devices import TRITON_DEVICE
from oracle import LOW_PRECISION, assert_matches_oracle

import interpkernels
from interpkernels import reference

ops = torch.ops.interpkernels


def apd_grad_attributions(h, B, grad_rows):
    """calc_grad_attributions' loop in float64, over the layers l of the lists: component_acts_l
    [N, C, d_l] = sum_r h_l[n,c,r] B_l[c,r] (APD: the layer input times each component's weight);
    per output o, feature_attributions = sum_l grad_l[n] . component_acts_l[n, c] with
    grad_l = grad_rows[l][:, o], then attributions += feature_attributions^2."""
    component_acts = [torch.einsum("ncr,crd->ncd", h_l.double(), B_l.double()) for h_l, B_l in zip(h, B)]
    attributions = torch.zeros(component_acts[0].shape[:2], dtype=torch.float64)
    for o in range(grad_rows[0].shape[1]):
        feature_attributions = torch.zeros_like(attributions)
        for acts, rows in zip(component_acts, grad_rows):
            feature_attributions += torch.einsum("nd,ncd->nc", rows[:, o].double(), acts)
        attributions += feature_attributions**2
    return attributions


def output_rows_by_backward(h, B, outputs, seed=1):
    """G_l [N, O, d_l] in float64 for each layer, APD's way: layer l's output y_l = sum_{c,r}
    h_l[n,c,r] B_l[c,r] is read into a shared stream by P_l [d_l, 8] (a residual stream), a
    nonlinear head f maps the stream to O outputs, and each output o takes one backward,
    grad_l = d f_o / d y_l."""
    generator = torch.Generator().manual_seed(seed)
    ys = [torch.einsum("ncr,crd->nd", h_l.double(), B_l.double()).requires_grad_() for h_l, B_l in zip(h, B)]
    stream = sum(y @ torch.randn(y.shape[-1], 8, generator=generator, dtype=torch.float64) / y.shape[-1]**0.5
                 for y in ys)
    head = torch.randn(outputs, 8, generator=generator, dtype=torch.float64) / 8**0.5
    out = torch.tanh(stream @ head.T) + (stream @ head.T).square() / 10
    rows = [torch.autograd.grad(out[:, o].sum(), ys, retain_graph=True) for o in range(outputs)]
    return [torch.stack([grads[l] for grads in rows], 1) if rows else y.new_zeros(y.shape[0], 0, y.shape[-1])
            for l, y in enumerate(ys)]


def make_layers(N, C, O, layers, dtype):
    """Lists (h, B, G), one entry per layer of `layers` = [(m_l, d_l), ...], in dtype, and the
    float64 oracle of the attributions of those (rounded) inputs."""
    h = [torch.randn(N, C, m, dtype=torch.float64) for m, _ in layers]
    B = [torch.randn(C, m, d, dtype=torch.float64) / d**0.5 for m, d in layers]
    G = output_rows_by_backward(h, B, O)
    h, B, G = ([t.to(dtype) for t in tensors] for tensors in (h, B, G))
    return h, B, G, apd_grad_attributions(h, B, G)


def make_problem(N, C, m, O, d, dtype):
    """(h, B, G) of one layer in dtype and the float64 oracle of the attributions of those (rounded) inputs."""
    (h,), (B,), (G,), oracle = make_layers(N, C, O, [(m, d)], dtype)
    return h, B, G, oracle


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


# (N, C, O, [(m_l, d_l) per layer]): the first two take the projection path, the last two the
# gram path (D^2 (O + C) + C S < O C S with D = sum d_l, S = sum m_l d_l); ranks and widths differ
# between layers, a layer of width 1 and one of rank 1 among them.
LAYER_SHAPES = [(7, 13, 3, [(1, 5), (2, 7)]), (5, 6, 4, [(3, 2), (1, 1), (2, 9)]),
                (4, 11, 29, [(2, 2), (1, 3)]), (3, 17, 31, [(1, 1), (1, 2)])]


@pytest.mark.parametrize("shape", LAYER_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_layers_add_before_the_square_as_in_apd(shape, dtype, backend):
    N, C, O, layers = shape
    h, B, G, oracle = make_layers(N, C, O, layers, dtype)
    # The rank-1 layers as APD's rank-1 form, U [C, d] and h [N, C].
    U = [B_l[:, 0] if m == 1 else B_l for B_l, (m, _) in zip(B, layers)]
    h_arg = [h_l[..., 0] if m == 1 else h_l for h_l, (m, _) in zip(h, layers)]
    out = interpkernels.component_attribution(h_arg, U, G, backend=backend)
    assert out.dtype == dtype and out.shape == (N, C)
    torch_same_dtype = reference.component_attribution(h_arg, U, G) if dtype in LOW_PRECISION else None
    assert_matches_oracle(out, oracle, torch_same_dtype)


def test_layers_summed_apart_are_not_apds_attribution():
    """The problem tells the two apart: the sum of one call per layer (each layer squared
    alone) is far from APD's attribution, which the call over the list matches."""
    h, B, G, oracle = make_layers(6, 9, 5, [(1, 4), (2, 3)], torch.float64)
    together = interpkernels.component_attribution(h, B, G)
    apart = sum(interpkernels.component_attribution(*layer) for layer in zip(h, B, G))
    assert_matches_oracle(together, oracle)
    assert ((apart - oracle).abs().max() / oracle.abs().max()).item() > 0.1


def test_one_layer_in_a_list_is_the_tensor_call():
    h, B, G, _ = make_problem(5, 7, 2, 3, 4, torch.float32)
    for backend in ("cpu", "torch"):
        torch.testing.assert_close(interpkernels.component_attribution([h], (B,), [G], backend=backend),
                                   interpkernels.component_attribution(h, B, G, backend=backend), rtol=0, atol=0)


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
    """Projection path (O small) and gram path (O large), one layer and two, at sizes that go
    parallel and span several tiles of tokens and chunks of components."""
    for O, d in ((4, 64), (300, 8)):
        for layers in (1, 2):
            h = [torch.randn(64, 600) for _ in range(layers)]
            U = [torch.randn(600, d + l) for l in range(layers)]
            G = [torch.randn(64, O, d + l) for l in range(layers)]
            first = interpkernels.component_attribution(h, U, G)
            assert torch.equal(first, interpkernels.component_attribution(h, U, G))
            torch.testing.assert_close(first, reference.component_attribution(h, U, G), rtol=2e-5, atol=0)


def test_projection_tiles_sum_the_layers_of_every_tile():
    """The CPU projection path over two layers with several tiles of tokens (204 per tile at
    O = 5; the last one partial) and of components (682 per tile at rank 3), against the dense
    formula in float64."""
    generator = torch.Generator().manual_seed(2)
    h = [torch.randn(410, 1500, 3, generator=generator), torch.randn(410, 1500, generator=generator)]
    U = [torch.randn(1500, 3, 16, generator=generator), torch.randn(1500, 20, generator=generator)]
    G = [torch.randn(410, 5, 16, generator=generator), torch.randn(410, 5, 20, generator=generator)]
    out = interpkernels.component_attribution(h, U, G, backend="cpu")
    oracle = reference.component_attribution(*([t.double() for t in tensors] for tensors in (h, U, G)))
    assert_matches_oracle(out, oracle)


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


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_float64_over_layers(backend):
    h, B, G, _ = make_layers(3, 4, 5, [(1, 3), (2, 2)], torch.float64)
    h[0], B[0] = h[0][..., 0], B[0][:, 0]  # a rank-1 layer beside a rank-2 one
    inputs = [t.clone().requires_grad_() for t in (*h, *B, *G)]

    def fn(h0, h1, B0, B1, G0, G1):
        return interpkernels.component_attribution([h0, h1], [B0, B1], [G0, G1], backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_backward_blocks_tokens_like_one_pass(monkeypatch):
    """The backward's token blocks change nothing but memory."""
    module = importlib.import_module("interpkernels.ops.component_attribution")

    h, B, G, _ = make_layers(7, 5, 3, [(2, 4), (1, 3)], torch.float64)
    grads = []
    for block_entries in (1 << 22, 31):
        monkeypatch.setattr(module, "_BACKWARD_BLOCK_ENTRIES", block_entries)
        inputs = [[t.clone().requires_grad_() for t in tensors] for tensors in (h, B, G)]
        interpkernels.component_attribution(*inputs).sum().backward()
        grads.append([t.grad for tensors in inputs for t in tensors])
    for one, blocked in zip(*grads):
        torch.testing.assert_close(blocked, one, rtol=1e-12, atol=1e-14)


def opcheck_samples():
    torch.manual_seed(0)  # runs at collection, before the seeding fixture
    for ranks in ((1,), (3,), (1, 2)):
        yield ([torch.randn(4, 6, m, requires_grad=True) for m in ranks],
               [torch.randn(6, m, 5 + l, requires_grad=True) for l, m in enumerate(ranks)],
               [torch.randn(4, 7, 5 + l, requires_grad=True) for l in range(len(ranks))])


@pytest.mark.parametrize("args", list(opcheck_samples()), ids=["rank1", "rank3", "two-layers"])
def test_opcheck(args):
    torch.library.opcheck(ops.component_attribution.default, args)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    """One layer, and two layers as lists."""
    torch._dynamo.reset()
    h, U, G = torch.randn(2, 5, 6), torch.randn(6, 4), torch.randn(2, 5, 3, 4)
    h2, B2, G2 = torch.randn(2, 5, 6, 2), torch.randn(6, 2, 3), torch.randn(2, 5, 3, 3)

    def loss(h, U, G, h2, B2, G2):
        return (interpkernels.component_attribution(h, U, G).sqrt().sum()
                + interpkernels.component_attribution([h, h2], [U, B2], [G, G2]).sqrt().sum())

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in (h, U, G, h2, B2, G2)]
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
        # layers: h, U and G as sequences of one entry per layer sharing the tokens, C and O
        (([], [], []), ValueError, "h: expected at least one layer"),
        (([torch.randn(3, 4)] * 2, [torch.randn(4, 2)], [torch.randn(3, 5, 2)] * 2), ValueError,
         r"U: expected a sequence of 2 tensors"),
        (([torch.randn(3, 4)], [torch.randn(4, 2)], torch.randn(3, 5, 2)), TypeError,
         r"G: expected a sequence of 1 tensors"),
        (([torch.randn(3, 4)] * 2, [torch.randn(4, 2), torch.randn(5, 2)], [torch.randn(3, 5, 2)] * 2), ValueError,
         r"U\[1\]: expected shape \[C = 4 \(that of layer 0\), d\]"),
        (([torch.randn(3, 4), torch.randn(2, 4)], [torch.randn(4, 2)] * 2, [torch.randn(3, 5, 2)] * 2), ValueError,
         r"h\[1\]: expected shape .* with leading dims \[3\] \(those of h\[0\]\)"),
        (([torch.randn(3, 4)] * 2, [torch.randn(4, 2)] * 2, [torch.randn(3, 5, 2), torch.randn(3, 6, 2)]), ValueError,
         r"G\[1\]: expected shape \[..., O, d\] = \[3, 5 \(O of G\[0\]\), 2\]"),
        (([torch.randn(3, 4)] * 2, [torch.randn(4, 2), torch.randn(4, 2).double()], [torch.randn(3, 5, 2)] * 2),
         TypeError, r"U\[1\]: expected dtype float32 \(the dtype of h\[0\]\)"),
    ],
)
def test_bad_input_names_the_argument(args, error, message):
    with pytest.raises(error, match=message):
        interpkernels.component_attribution(*args)


def test_op_checks_shapes_itself():
    with pytest.raises(ValueError, match="component_attribution: expected h"):
        ops.component_attribution([torch.randn(3, 4, 1)], [torch.randn(4, 2, 5)], [torch.randn(3, 2, 5)])
    with pytest.raises(ValueError, match=r"\(N, C, O shared\), got for layer 1: "):
        ops.component_attribution([torch.randn(3, 4, 1)] * 2, [torch.randn(4, 1, 5)] * 2,
                                  [torch.randn(3, 2, 5), torch.randn(3, 3, 5)])
    with pytest.raises(ValueError, match="one h, B and G per layer"):
        ops.component_attribution([torch.randn(3, 4, 1)] * 2, [torch.randn(4, 1, 5)], [torch.randn(3, 2, 5)] * 2)


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


@pytest.mark.usefixtures("triton_as_on_gpu")
@pytest.mark.parametrize("shape", [(3, 5, 3, [(1, 7), (2, 20)]), (2, 19, 17, [(2, 5), (1, 1), (1, 3)])], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_layers_add_before_the_square(shape, dtype):
    N, C, O, layers = shape
    h, B, G, oracle = make_layers(N, C, O, layers, dtype)
    h, B, G = ([t.to(TRITON_DEVICE) for t in tensors] for tensors in (h, B, G))
    out = interpkernels.component_attribution(h, B, G, backend="triton")
    torch_same_dtype = reference.component_attribution(h, B, G).cpu() if dtype in LOW_PRECISION else None
    assert_matches_oracle(out.cpu(), oracle, torch_same_dtype)


@pytest.mark.usefixtures("triton_as_on_gpu")
@pytest.mark.parametrize("args", list(opcheck_samples()), ids=["rank1", "rank3", "two-layers"])
def test_triton_opcheck(args):
    """The Triton registration (on TRITON_DEVICE): schema, fake, autograd."""
    args = tuple([t.detach().to(TRITON_DEVICE).requires_grad_() for t in tensors] for tensors in args)
    torch.library.opcheck(ops.component_attribution_triton.default, args)
