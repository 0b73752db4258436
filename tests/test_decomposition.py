"""interpkernels.decomposition: the top-k component forward against dense
formulas (values, grad_V, grad_x, grad_U), SPD's masked forward op (opcheck,
gradcheck, SPEC backward), the Schatten simplicity, the batched output
Jacobian and its random-probe estimate, and LinearComponents."""

import pytest
import torch
from torch import nn

import interpkernels
from interpkernels import masked_component_forward, reference
from interpkernels.decomposition import (
    LinearComponents,
    batch_topk_components,
    component_forward,
    output_jacobian_rows,
    schatten_simplicity,
    stochastic_masks,
    topk_components,
)
from devices import TRITON_DEVICE
from oracle import ALL_DTYPES, assert_matches_oracle

ops = torch.ops.interpkernels


# ---- top-k component forward ----


def dense_topk_forward(x, V, U, bias, mask):
    """y = ((x @ V) * mask) @ U + bias with mask [N, C] in {0, 1}: the definition."""
    return ((x @ V) * mask) @ U + bias


@pytest.mark.parametrize("batch", [False, True])
def test_topk_forward_and_gradients_match_dense(batch):
    N, d_in, C, d_out, k = 11, 7, 13, 5, 3
    x, V, U, bias = torch.randn(N, d_in), torch.randn(d_in, C), torch.randn(C, d_out), torch.randn(d_out)
    attributions = torch.rand(N, C)
    if batch:
        indices, keep = batch_topk_components(attributions, 2.5)
        assert keep.sum() == round(2.5 * N)
    else:
        indices, keep = topk_components(attributions, k), None
    mask = torch.zeros(N, C).scatter_(1, indices, 1.0 if keep is None else keep.float())
    results = []
    for run in ("ours", "dense"):
        leaves = [t.clone().requires_grad_() for t in (x, V, U, bias)]
        lx, lV, lU, lb = leaves
        if run == "ours":
            out = component_forward(lx @ lV, lU, indices, lb, keep=keep)
        else:
            out = dense_topk_forward(lx, lV, lU, lb, mask)
        grad_out = torch.randn_like(out, generator=torch.Generator().manual_seed(3))
        out.backward(grad_out)
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    for ours, dense in zip(*results):  # out, grad_x, grad_V, grad_U, grad_bias
        torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)


def test_batch_topk_is_the_largest_entries_of_the_batch():
    attributions = torch.rand(9, 20)
    indices, keep = batch_topk_components(attributions, 2.0, max_per_row=20)
    chosen = attributions.gather(1, indices)[keep]
    threshold = attributions.flatten().topk(18).values.min()
    assert chosen.numel() == 18 and bool((chosen >= threshold).all())


def test_rank_m_topk_forward_matches_dense():
    N, d_in, C, m, d_out = 6, 5, 7, 3, 4
    x, A, B = torch.randn(N, d_in), torch.randn(C, d_in, m), torch.randn(C, m, d_out)
    indices = topk_components(torch.rand(N, C), 2)
    mask = torch.zeros(N, C).scatter_(1, indices, 1.0)
    h = torch.einsum("ni,cim->ncm", x, A)
    torch.testing.assert_close(component_forward(h, B, indices),
                               torch.einsum("ncm,cmo->no", h * mask[..., None], B), rtol=1e-5, atol=1e-5)


def test_selection_bad_inputs():
    with pytest.raises(ValueError, match="k: expected"):
        topk_components(torch.rand(3, 4), 5)
    with pytest.raises(ValueError, match="k: expected a number"):
        batch_topk_components(torch.rand(3, 4), 0)
    with pytest.raises(IndexError, match="indices"):
        component_forward(torch.randn(3, 4), torch.randn(4, 2), torch.full((3, 1), 4))
    with pytest.raises(ValueError, match="h: expected shape"):
        component_forward(torch.randn(3, 5), torch.randn(4, 2), torch.zeros(3, 1, dtype=torch.long))


# ---- SPD masked forward ----


def spd_problem(dtype=torch.float64, N=5, d_in=4, C=6, d_out=3):
    g = torch.Generator().manual_seed(7)
    x, V, U = (torch.randn(*s, generator=g, dtype=dtype) for s in ((N, d_in), (d_in, C), (C, d_out)))
    W_target = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    mask, delta_mask, bias = (torch.rand(*s, generator=g, dtype=dtype) for s in ((N, C), (N,), (d_out,)))
    return x, V, U, W_target, mask, delta_mask, bias


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_masked_forward_matches_float64_oracle(dtype, backend):
    """Values against reference.masked_component_forward in float64: leading dims
    [2, 3], C = 13 (prime), non-contiguous h and U; torch's own error in 16 bits."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    h = torch.randn(2, 3, 26, generator=g, dtype=torch.float64)[..., ::2]  # strided
    U = torch.randn(4, 13, generator=g, dtype=torch.float64).T  # transposed
    mask, delta_mask = torch.rand(2, 3, 13, generator=g, dtype=torch.float64), torch.rand(2, 3, generator=g,
                                                                                          dtype=torch.float64)
    W_delta, bias = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    inputs = (x, h, mask, U, W_delta, delta_mask, bias)
    oracle = reference.masked_component_forward(*inputs)
    low = [t.to(dtype) for t in inputs]
    out = masked_component_forward(*low[:4], W_delta=low[4], delta_mask=low[5], bias=low[6], backend=backend)
    assert not h.is_contiguous() and not U.is_contiguous() and out.dtype == dtype
    assert_matches_oracle(out, oracle, reference.masked_component_forward(*low))
    # all-ones masks and the delta of the target give back the target layer
    V = torch.randn(5, 13, generator=g, dtype=torch.float64)
    W_target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    full = masked_component_forward(x, x @ V, torch.ones_like(mask), U, W_delta=W_target - (V @ U).T,
                                    delta_mask=torch.ones_like(delta_mask), bias=bias)
    torch.testing.assert_close(full, x @ W_target.T + bias, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("triton_as_on_gpu")
@pytest.mark.parametrize("with_delta, with_delta_mask, with_bias", [(True, True, True), (True, False, False),
                                                                    (False, False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_forward_triton_matches_float64_oracle(dtype, with_delta, with_delta_mask, with_bias):
    """The fused Triton kernel: N = 70 and d_out = 67 past one 64-wide tile, J = 2 * 19
    pieces (rank 2) past one 32-wide step, d_in = 37; strided h, transposed U and W_delta;
    its gradients (the shared backward) against the reference's."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 37, generator=g, dtype=torch.float64)
    h = torch.randn(70, 19, 4, generator=g, dtype=torch.float64)[..., ::2]  # strided
    U = torch.randn(67, 19, 2, generator=g, dtype=torch.float64).permute(1, 2, 0)  # [C, m, d_out], strided
    mask = torch.rand(70, 19, generator=g, dtype=torch.float64)
    W_delta = torch.randn(37, 67, generator=g, dtype=torch.float64).T if with_delta else None
    delta_mask = torch.rand(70, generator=g, dtype=torch.float64) if with_delta_mask else None
    bias = torch.randn(67, generator=g, dtype=torch.float64) if with_bias else None
    inputs = [x, h, mask, U, W_delta, delta_mask, bias]
    oracle = reference.masked_component_forward(*inputs)
    low = [None if t is None else t.to(TRITON_DEVICE, dtype).requires_grad_() for t in inputs]
    out = masked_component_forward(*low[:4], W_delta=low[4], delta_mask=low[5], bias=low[6], backend="triton")
    torch_same_dtype = reference.masked_component_forward(*(None if t is None else t.detach().cpu() for t in low))
    assert_matches_oracle(out.cpu(), oracle, torch_same_dtype if dtype != torch.float32 else None)
    if dtype == torch.float32:
        grad_out = torch.randn(70, 67, generator=g, dtype=torch.float64)
        leaves = [t for t in low if t is not None]
        unused_x = dict(allow_unused=True, materialize_grads=True)  # no delta term: x does not enter
        grads = torch.autograd.grad(out, leaves, grad_out.to(TRITON_DEVICE, dtype), **unused_x)
        exact = [None if t is None else t.detach().requires_grad_() for t in inputs]
        expected = reference.masked_component_forward(*exact)
        wanted = torch.autograd.grad(expected, [t for t in exact if t is not None], grad_out, **unused_x)
        for got, want in zip(grads, wanted, strict=True):
            torch.testing.assert_close(got.cpu().double(), want, rtol=1e-4, atol=1e-4)


def test_masked_forward_gradcheck_and_rank_m():
    x, V, U, W_target, mask, delta_mask, bias = spd_problem()
    W_delta = W_target - (V @ U).T
    inputs = [t.clone().requires_grad_() for t in (x, x @ V, mask, U, W_delta, delta_mask, bias)]

    def fn(x, h, mask, U, W_delta, delta_mask, bias):
        return masked_component_forward(x, h, mask, U, W_delta=W_delta, delta_mask=delta_mask, bias=bias)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)
    # rank m = 2: values and every gradient against the reference's autograd
    g = torch.Generator().manual_seed(8)
    rank_m = [torch.randn(5, 6, 2, generator=g, dtype=torch.float64), mask, torch.randn(6, 2, 3, generator=g,
                                                                                        dtype=torch.float64)]
    rank_m = [t.clone().requires_grad_() for t in rank_m]
    grad_out = torch.randn(5, 3, generator=g, dtype=torch.float64)
    got = masked_component_forward(x, *rank_m)
    expected = reference.masked_component_forward(x, *rank_m)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for want, have in zip(torch.autograd.grad(expected, rank_m, grad_out), torch.autograd.grad(got, rank_m, grad_out)):
        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("triton_as_on_gpu")
@pytest.mark.parametrize("op_name", ["masked_component_forward", "masked_component_forward_triton"])
@pytest.mark.parametrize("with_delta", [True, False])
def test_masked_forward_opcheck(with_delta, op_name):
    """The native op and its Triton registration (on TRITON_DEVICE): schema, fake, autograd."""
    device = "cpu" if op_name == "masked_component_forward" else TRITON_DEVICE
    x, V, U, W_target, mask, delta_mask, bias = (t.to(device) for t in spd_problem(torch.float32))
    W_delta = (W_target - (V @ U).T) if with_delta else None
    args = (x.requires_grad_(), (x @ V).detach().requires_grad_(), mask.requires_grad_(), U.requires_grad_(),
            W_delta.detach().requires_grad_() if with_delta else None, delta_mask if with_delta else None, bias)
    torch.library.opcheck(getattr(ops, op_name).default, args)


def test_masked_forward_bad_inputs():
    x, V, U, W_target, mask, delta_mask, bias = spd_problem(torch.float32)
    with pytest.raises(ValueError, match="mask: expected shape"):
        masked_component_forward(x, x @ V, mask[:, :2], U)
    with pytest.raises(ValueError, match="delta_mask: given without W_delta"):
        masked_component_forward(x, x @ V, mask, U, delta_mask=delta_mask)
    with pytest.raises(TypeError, match="U: expected dtype"):
        masked_component_forward(x, x @ V, mask, U.double())
    with pytest.raises(ValueError, match="backend: 'cuda' runs on cuda tensors"):
        masked_component_forward(x, x @ V, mask, U, backend="cuda")
    with pytest.raises(ValueError, match="W_delta: expected shape"):
        ops.masked_component_forward(x, x @ V, mask, U, W_target.T.contiguous(), None, None)


def test_schatten_simplicity_rank_one_is_product_of_norms():
    layer = LinearComponents(nn.Linear(4, 3), 5, generator=torch.Generator().manual_seed(2))
    active = (torch.rand(7, 5) < 0.5).float()
    sigma = layer.V.norm(dim=0) * layer.U.norm(dim=1)  # the one singular value of U[c] (x) V[:, c]
    singular = torch.stack([torch.linalg.svdvals(w)[0] for w in layer.component_weights()])
    torch.testing.assert_close(sigma, singular, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(schatten_simplicity([layer], active, 0.9), (active @ sigma.pow(0.9)).mean(),
                               rtol=1e-5, atol=1e-6)


def test_stochastic_masks_keep_important_components():
    importance = torch.tensor([[1.0, 0.0, 0.5]]).expand(1000, 3)
    masks = stochastic_masks(importance, generator=torch.Generator().manual_seed(0))
    assert bool((masks[:, 0] == 1).all()) and bool(((masks >= importance) & (masks <= 1)).all())
    assert abs(masks[:, 1].mean().item() - 0.5) < 0.05


# ---- G: batched output Jacobian ----


def small_model(d=4, O=6):
    g = torch.Generator().manual_seed(5)
    first, second = torch.randn(d, 3, generator=g), torch.randn(O, d, generator=g)
    return first, second


def test_output_jacobian_rows_equal_one_backward_per_output():
    first, second = small_model()
    x = torch.randn(2, 3, 3)
    y = (x @ first.T).requires_grad_()
    out = torch.tanh(y) @ second.T  # [2, 3, O]
    (G,) = output_jacobian_rows(out, [y])
    assert G.shape == (2, 3, 6, 4)
    for o in range(6):  # APD's loop: one backward of out[..., o].sum() per output
        (grad,) = torch.autograd.grad(out[..., o].sum(), y, retain_graph=True)
        torch.testing.assert_close(G[..., o, :], grad)


def test_probe_estimate_is_unbiased_for_the_attributions():
    first, second = small_model(d=4, O=40)
    x = torch.randn(3, 3)
    y = (x @ first.T).requires_grad_()
    out = torch.tanh(y) @ second.T
    h, U = torch.randn(3, 5), torch.randn(5, 4)
    (G,) = output_jacobian_rows(out, [y])
    exact = interpkernels.component_attribution(h, U, G)
    (G_probe,) = output_jacobian_rows(out, [y], probes=4000, generator=torch.Generator().manual_seed(0))
    estimate = interpkernels.component_attribution(h, U, G_probe)
    assert G_probe.shape == (3, 4000, 4)
    # relative standard deviation <= sqrt(2 / P) = 0.022 per entry: 5 sigma
    torch.testing.assert_close(estimate, exact, rtol=0.12, atol=0)


def test_probe_estimate_is_unbiased_for_the_attributions_over_two_layers():
    """The probes are shared by the layers of one call, so the estimate of
    sum_o (sum_l G_l[n, o] . w_l)^2 stays unbiased."""
    first, second = small_model(d=4, O=40)
    x = torch.randn(3, 3)
    y1 = (x @ first.T).requires_grad_()
    y2 = torch.tanh(y1) @ torch.randn(4, 4) / 2
    out = torch.tanh(y2) @ second.T
    h, U = [torch.randn(3, 5), torch.randn(3, 5)], [torch.randn(5, 4), torch.randn(5, 4)]
    exact = interpkernels.component_attribution(h, U, output_jacobian_rows(out, [y1, y2]))
    probes = output_jacobian_rows(out, [y1, y2], probes=4000, generator=torch.Generator().manual_seed(0))
    # relative standard deviation <= sqrt(2 / P) = 0.022 per entry: 5 sigma
    torch.testing.assert_close(interpkernels.component_attribution(h, U, probes), exact, rtol=0.12, atol=0)


def test_layer_components_forward_modes_agree_with_the_target():
    target = nn.Linear(6, 4)
    layer = LinearComponents(target, 3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 6)
    all_components = torch.ones(5, 3)
    torch.testing.assert_close(layer.masked_forward(x, all_components), layer(x))
    torch.testing.assert_close(layer.masked_forward(x, all_components, torch.ones(5)), target(x), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(layer.topk_forward(x, torch.arange(3).expand(5, 3)), layer(x), rtol=1e-5, atol=1e-5)
    rank_m = LinearComponents(target, 3, rank=2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(rank_m(x), x @ rank_m.weight().T + target.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rank_m.component_weights().sum(0), rank_m.weight(), rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="target: expected an nn.Linear"):
        LinearComponents(nn.ReLU(), 3)


# ---- the APD step ----


def test_apd_attributions_through_two_layers_match_apds_calc_grad_attributions():
    """APD's loop (ApolloResearch/apd spd/utils.py::calc_grad_attributions, commit 4e29d43,
    lines 159-231), in float64: component_acts from each layer's detached input and component
    weights; per output, one backward of its sum over tokens to every layer's output (each
    layer's G sees the outputs through the layers after it), the layers' terms added, then
    squared: a component spans both layers."""
    from interpkernels.decomposition import apd_attributions

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 5)).double()
    generator = torch.Generator().manual_seed(4)
    layers = {name: LinearComponents(model.get_submodule(name), 6, generator=generator) for name in ("0", "2")}
    x = torch.randn(7, 4, dtype=torch.float64)
    attributions, target_out = apd_attributions(model, layers, x)
    # the target run by hand with its post-weight activations kept
    post_weight_acts = {"0": model[0](x).requires_grad_()}
    pre_weight_acts = {"0": x, "2": torch.tanh(post_weight_acts["0"])}
    post_weight_acts["2"] = model[2](pre_weight_acts["2"])
    component_acts = {name: torch.einsum("ni,coi->nco", pre_weight_acts[name].detach(),
                                         layers[name].component_weights().detach())
                      for name in layers}
    expected = torch.zeros(7, 6, dtype=torch.float64)
    for o in range(5):
        grads = torch.autograd.grad(post_weight_acts["2"][:, o].sum(), list(post_weight_acts.values()),
                                    retain_graph=True)
        feature_attributions = torch.zeros(7, 6, dtype=torch.float64)
        for name, grad in zip(post_weight_acts, grads):
            feature_attributions += torch.einsum("nd,ncd->nc", grad, component_acts[name])
        expected += feature_attributions**2
    torch.testing.assert_close(attributions, expected)
    torch.testing.assert_close(target_out, model(x))


@pytest.mark.slow
def test_masked_and_topk_forwards_compile_without_graph_breaks():
    torch._dynamo.reset()
    x, V, U, W_target, mask, delta_mask, bias = spd_problem(torch.float32)
    indices = topk_components(torch.rand(5, 6), 2)

    def loss(x, V, U, mask, delta_mask):
        h = x @ V
        spd = masked_component_forward(x, h, mask, U, W_delta=W_target - (V @ U).T, delta_mask=delta_mask, bias=bias)
        apd = component_forward(h, U, indices, bias)
        return spd.square().sum() + apd.square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    results = []
    for fn in (loss, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, V, U, mask, delta_mask)]
        value = fn(*leaves)
        value.backward()
        results.append([value.detach(), *(leaf.grad for leaf in leaves)])
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-4, atol=1e-5)
