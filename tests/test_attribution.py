"""Attribution patching ops (latent_attribution, error_attribution, feature_edges)
against float64 oracles: the dense autograd formulation feature-circuits uses,
and the dense references (docs/OPS.md)."""

import pytest
import torch
from devices import backends_and_devices
from devices import TRITON_DEVICE
from oracle import ALL_DTYPES, assert_matches_oracle

import interpkernels
from interpkernels import reference

ops = torch.ops.interpkernels
BACKENDS = backends_and_devices()
BACKEND_IDS = [backend for backend, _ in BACKENDS]


def dtypes_of(backend):
    return ALL_DTYPES if backend in ("cpu", "torch") else (torch.float32, torch.bfloat16, torch.float16)


def randn(*shape, dtype=torch.float64, device="cpu"):
    return torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)


def make_codes(leading, k_clean, k_patched, shared, M, *, dtype=torch.float64, device="cpu", unique=True):
    """Clean and patched codes whose rows share `shared` latents (at shuffled
    positions); values of both signs, never zero."""
    def values(k):
        v = torch.randn(*leading, k, dtype=torch.float64)
        return (v + v.sign() * 0.1).to(dtype=dtype, device=device)

    if unique:
        order = torch.rand(*leading, M).argsort(dim=-1)
        clean = order[..., :k_clean]
        patched = torch.cat([order[..., :shared], order[..., k_clean:k_clean + k_patched - shared]], -1)
        patched = patched.gather(-1, torch.rand(patched.shape).argsort(dim=-1))
    else:
        clean, patched = torch.randint(0, M, (*leading, k_clean)), torch.randint(0, M, (*leading, k_patched))
    return values(k_clean), clean.to(device), values(k_patched), patched.to(device)


def autograd_attribution(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec):
    """feature-circuits' way, in float64: f dense [N, M] with requires_grad, the
    metric's backward through x_hat = f @ W_dec gives dm/df; attr = (f_p - f_c) * dm/df
    on the union of the supports. Dense [N, M] and the support mask."""
    M, d = W_dec.shape
    f_clean = reference.densify(clean_values.double().reshape(-1, clean_values.shape[-1]),
                                clean_indices.reshape(-1, clean_indices.shape[-1]), M).requires_grad_()
    f_patched = reference.densify(patched_values.double().reshape(-1, patched_values.shape[-1]),
                                  patched_indices.reshape(-1, patched_indices.shape[-1]), M)
    metric = ((f_clean @ W_dec.double()) * grad.double().reshape(-1, d)).sum()  # dm/dx_hat = grad
    (grad_f,) = torch.autograd.grad(metric, f_clean)
    support = torch.zeros_like(f_patched, dtype=torch.bool)
    support.scatter_(1, clean_indices.reshape(f_clean.shape[0], -1), True)
    support.scatter_(1, patched_indices.reshape(f_clean.shape[0], -1), True)
    return (f_patched - f_clean.detach()) * grad_f * support, support


# (leading, k_clean, k_patched, shared, M, d): 1s, primes, supports equal, disjoint, k = M, 3-D codes.
SHAPES = [
    ((1,), 1, 1, 1, 1, 1),
    ((37,), 7, 5, 3, 301, 19),
    ((13,), 13, 13, 13, 13, 5),
    ((4, 9), 3, 4, 0, 50, 33),
    ((64,), 32, 32, 20, 1000, 129),
]


@pytest.mark.parametrize("leading,k_clean,k_patched,shared,M,d", SHAPES)
def test_reference_equals_dense_autograd(leading, k_clean, k_patched, shared, M, d):
    code = make_codes(leading, k_clean, k_patched, shared, M)
    grad, W_dec = randn(*leading, d), randn(M, d)
    dense, support = autograd_attribution(*code, grad, W_dec)
    sparse = reference.latent_attribution(*code, grad, W_dec)
    assert sparse._nnz() == int(support.sum())
    torch.testing.assert_close(sparse.to_dense().reshape(dense.shape), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.latent_attribution(*code, grad, W_dec, reduce="sum"), dense.sum(0))
    torch.testing.assert_close(reference.latent_attribution(*code, grad, W_dec, reduce="mean_abs"),
                               dense.abs().mean(0))


def _dense_of(result):
    return result.to_dense() if result.is_sparse else result


def interpreted(backend, device):
    return (backend, device) == ("triton", "cpu")


# The Triton interpreter runs the largest shape too slowly for CI; GPUs run all.
@pytest.mark.parametrize("backend,device,leading,k_clean,k_patched,shared,M,d", [
    (backend, device, *shape) for backend, device in BACKENDS for shape in SHAPES
    if not (interpreted(backend, device) and shape is SHAPES[-1])])
def test_latent_attribution_matches_oracle(backend, device, leading, k_clean, k_patched, shared, M, d,
                                           triton_as_on_gpu):
    for dtype in (torch.float32, torch.bfloat16) if interpreted(backend, device) else dtypes_of(backend):
        code = make_codes(leading, k_clean, k_patched, shared, M, dtype=dtype, device=device)
        grad, W_dec = randn(*leading, d, dtype=dtype, device=device), randn(M, d, dtype=dtype, device=device)
        oracle_args = [t.double() if t.is_floating_point() else t for t in (*code, grad, W_dec)]
        for reduce in ("none", "sum", "mean_abs"):
            got = interpkernels.latent_attribution(*code, grad, W_dec, reduce=reduce, backend=backend)
            assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            want = reference.latent_attribution(*oracle_args, reduce=reduce)
            if reduce == "none":
                assert got.is_sparse and got.is_coalesced() and got.shape == (*leading, M)
                assert torch.equal(got.indices().cpu(), want.indices())  # the union, every entry once
            # Scores are float32 for every input dtype below float64: float32's tolerance.
            assert_matches_oracle(_dense_of(got).cpu(), _dense_of(want))


def test_repeated_latents_in_a_row_add_up_as_in_the_dense_code():
    code = make_codes((30,), 6, 6, 0, 5, unique=False)
    grad, W_dec = randn(30, 7), randn(5, 7)
    want = reference.latent_attribution(*code, grad, W_dec)
    for backend in ("cpu", "triton"):
        if backend not in interpkernels.build_info()["backends"]:
            continue
        got = interpkernels.latent_attribution(*(t.float() if t.is_floating_point() else t for t in code),
                                               grad.float(), W_dec.float(), backend=backend)
        assert torch.equal(got.indices(), want.indices())
        torch.testing.assert_close(got.values(), want.values().float(), rtol=1e-5, atol=1e-5)


def test_union_slots_of_the_raw_op():
    """Slots: clean entries, then patched; a latent already held by an earlier
    slot gets -1 and zeros; deltas are f_p - f_c, dots W_dec[i] . grad[n]."""
    clean_values, clean_indices = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4, 0, 2]])
    patched_values, patched_indices = torch.tensor([[5.0, 7.0]]), torch.tensor([[2, 1]])
    grad, W_dec = torch.randn(1, 3), torch.randn(5, 3)
    deltas, dots, union = ops.latent_attribution(clean_values, clean_indices, patched_values, patched_indices, grad,
                                                 W_dec)
    assert union.tolist() == [[4, 0, 2, -1, 1]]
    assert deltas.tolist() == [[-1.0, -2.0, 2.0, 0.0, 7.0]]
    want_dots = torch.cat([W_dec[[4, 0, 2]] @ grad[0], torch.zeros(1), W_dec[[1]] @ grad[0]])
    torch.testing.assert_close(dots[0], want_dots)


def test_integrated_gradients_is_the_score_of_the_mean_gradient():
    """IG over S steps: the mean over steps of each step's AtP score equals
    the score of the mean site gradient (the latent path is linear)."""
    code = make_codes((11,), 4, 4, 2, 40)
    W_dec, steps = randn(40, 9), randn(6, 11, 9)
    per_step = torch.stack([interpkernels.latent_attribution(*code, g, W_dec, reduce="sum") for g in steps])
    torch.testing.assert_close(interpkernels.latent_attribution(*code, steps.mean(0), W_dec, reduce="sum"),
                               per_step.mean(0))


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("shape", [(1, 1), (37, 19), (4, 9, 33), (5,)])
def test_error_attribution_matches_oracle(backend, device, shape, triton_as_on_gpu):
    for dtype in dtypes_of(backend):
        clean, patched, grad = (randn(*shape, dtype=dtype, device=device) for _ in range(3))
        got = interpkernels.error_attribution(clean, patched, grad, backend=backend)
        assert got.shape == shape[:-1]
        want = ((patched.double() - clean.double()) * grad.double()).sum(-1)
        assert_matches_oracle(got.cpu(), want.cpu())  # float32 scores: float32's tolerance


def test_error_attribution_takes_strided_inputs():
    base = randn(8, 10, dtype=torch.float32)
    clean, patched, grad = base[:, ::2], base.T[:5].T, randn(5, 8, dtype=torch.float32).T
    want = ((patched - clean) * grad).sum(-1)
    for backend in interpkernels.build_info()["backends"]:
        torch.testing.assert_close(interpkernels.error_attribution(clean, patched, grad, backend=backend), want)


# (N, k_src, k_dst, M_src, M_dst, d)
EDGE_SHAPES = [(1, 1, 1, 1, 1, 1), (7, 5, 3, 31, 17, 19), (3, 16, 16, 16, 40, 33), (5, 20, 9, 200, 50, 8)]
PRUNINGS = [(None, None), (1, None), (4, None), (None, 0.5), (3, 0.5), (100, None)]


def make_edge_inputs(N, k_src, k_dst, M_src, M_dst, d, dtype=torch.float64, device="cpu"):
    """(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale), indices unique per row."""
    src_values = randn(N, k_src, dtype=torch.float64)
    src_values = (src_values + src_values.sign() * 0.1).to(dtype=dtype, device=device)
    src_indices = torch.rand(N, M_src).argsort(dim=-1)[:, :k_src].to(device)
    dst_indices = torch.rand(N, M_dst).argsort(dim=-1)[:, :k_dst].to(device)
    return (src_values, src_indices, randn(M_src, d, dtype=dtype, device=device), dst_indices,
            randn(M_dst, d, dtype=dtype, device=device), randn(N, k_dst, dtype=dtype, device=device))


# The torch backend has no padded op: the public forms test it.
@pytest.mark.parametrize("backend,device", [pair for pair in BACKENDS if pair[0] != "torch"],
                         ids=[backend for backend in BACKEND_IDS if backend != "torch"])
@pytest.mark.parametrize("N,k_src,k_dst,M_src,M_dst,d", EDGE_SHAPES)
def test_feature_edges_padded_form_matches_reference(backend, device, N, k_src, k_dst, M_src, M_dst, d,
                                                     triton_as_on_gpu):
    op = ops.feature_edges_triton if backend == "triton" else ops.feature_edges
    for dtype in (torch.float64, torch.float32) if backend == "cpu" else (torch.float32,):
        args = make_edge_inputs(N, k_src, k_dst, M_src, M_dst, d, dtype, device)
        edges = reference.feature_edge_scores(*(a.double() if a.is_floating_point() else a for a in args))
        for top_k, threshold in PRUNINGS:
            threshold = None if threshold is None else threshold * edges.abs().median().item()
            values, slots = op(*args, top_k, threshold)
            want_values, want_slots = reference.prune_edges(edges, top_k, threshold)
            assert torch.equal(slots.cpu(), want_slots), (top_k, threshold)
            assert_matches_oracle(values.cpu(), want_values)


@pytest.mark.parametrize("backend,device", BACKENDS, ids=BACKEND_IDS)
def test_feature_edges_public_forms(backend, device, triton_as_on_gpu):
    """reduce="none": sparse [..., M_dst, M_src] per token; "sum": over tokens;
    leading dims kept; low precision within 2x torch's own error."""
    for dtype in dtypes_of(backend):
        N, k_src, k_dst, M_src, M_dst, d = 12, 6, 5, 23, 19, 16
        args = list(make_edge_inputs(N, k_src, k_dst, M_src, M_dst, d, dtype, device))
        for position in (0, 1, 3, 5):  # [4, 3, k] codes
            args[position] = args[position].reshape(4, 3, -1)
        oracle_args = [a.double() if a.is_floating_point() else a for a in args]
        for top_k, threshold in ((2, None), (None, 1.0), (None, None)):
            for reduce in ("none", "sum"):
                got = interpkernels.feature_edges(*args, top_k=top_k, threshold=threshold, reduce=reduce,
                                                  backend=backend)
                want = reference.feature_edges(*oracle_args, top_k=top_k, threshold=threshold, reduce=reduce)
                assert got.is_sparse and got.is_coalesced() and got.shape == want.shape
                assert got.shape == ((4, 3, M_dst, M_src) if reduce == "none" else (M_dst, M_src))
                # Inputs are exact in every dtype and scores float32, so the pruning picks the same edges.
                assert torch.equal(got.indices().cpu(), want.indices())
                assert_matches_oracle(got.values().cpu(), want.values())


@pytest.mark.parametrize("backend", [b for b in ("cpu", "triton") if b in interpkernels.build_info()["backends"]])
def test_feature_edges_ties_go_to_the_lower_source_and_nan_ranks_first(backend, triton_as_on_gpu):
    device = "cpu" if backend == "cpu" else TRITON_DEVICE
    op = ops.feature_edges if backend == "cpu" else ops.feature_edges_triton
    W = randn(3, 16, dtype=torch.float32, device=device)
    W[2] = 3 * W[0]  # E at latent 2 (value 1): 3 |W[0]|^2, above latent 0's (value 0.5): |W[0]|^2 / 2
    src_indices = torch.tensor([[2, 0, 2, 1]], device=device)  # slots 0 and 2 hold one latent: an exact tie
    src_values = torch.tensor([[1.0, 0.5, 1.0, float("nan")]], device=device)
    dst_indices, dst_scale = torch.tensor([[0]], device=device), torch.ones(1, 1, device=device)
    values, slots = op(src_values, src_indices, W, dst_indices, W, dst_scale, 3, None)
    assert slots.tolist() == [[[3, 0, 2]]]
    assert values[0, 0, 0].isnan() and values[0, 0, 1] == values[0, 0, 2]
    values, slots = op(src_values, src_indices, W, dst_indices, W, dst_scale, None, float("inf"))
    assert slots.tolist() == [[[3, -1, -1, -1]]]  # NaN passes any threshold, as +inf would


@pytest.mark.parametrize("top_k,threshold", [(None, None), (2, None), (None, 0.3), (2, 0.3)])
def test_feature_edges_gradients(top_k, threshold):
    torch.manual_seed(3)
    N, k_src, k_dst, M_src, M_dst, d = 4, 5, 3, 9, 7, 6
    src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale = make_edge_inputs(
        N, k_src, k_dst, M_src, M_dst, d)
    leaves = [t.requires_grad_() for t in (src_values, W_dec_src, W_enc_dst, dst_scale)]

    def values(src_values, W_dec_src, W_enc_dst, dst_scale):
        return ops.feature_edges(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale, top_k,
                                 threshold)[0]

    assert torch.autograd.gradcheck(values, leaves)
    assert torch.autograd.gradgradcheck(values, leaves)


def test_latent_and_error_attribution_gradients():
    code = make_codes((6,), 3, 4, 2, 9)
    clean_values, patched_values = (code[0].requires_grad_(), code[2].requires_grad_())
    grad, W_dec = randn(6, 5).requires_grad_(), randn(9, 5).requires_grad_()
    leaves = (clean_values, patched_values, grad, W_dec)

    def summed(clean_values, patched_values, grad, W_dec):
        return interpkernels.latent_attribution(clean_values, code[1], patched_values, code[3], grad, W_dec,
                                                reduce="sum")

    def raw(clean_values, patched_values, grad, W_dec):
        return ops.latent_attribution(clean_values, code[1], patched_values, code[3], grad, W_dec)[:2]

    for fn in (summed, raw):
        assert torch.autograd.gradcheck(fn, leaves)
        assert torch.autograd.gradgradcheck(fn, leaves)
    errors = tuple(randn(6, 5).requires_grad_() for _ in range(2)) + (grad,)
    assert torch.autograd.gradcheck(interpkernels.error_attribution, errors)
    assert torch.autograd.gradgradcheck(interpkernels.error_attribution, errors)


def test_gradients_match_the_dense_autograd_formulation():
    """d(sum of scores)/d(W_dec) and /d(grad) equal those of the dense way."""
    code = make_codes((10,), 4, 4, 2, 30)
    grad, W_dec = randn(10, 8).requires_grad_(), randn(30, 8).requires_grad_()
    ours = torch.autograd.grad(interpkernels.latent_attribution(*code, grad, W_dec, reduce="sum").sum(),
                               (grad, W_dec))
    theirs = torch.autograd.grad(reference.latent_attribution(*code, grad, W_dec, reduce="sum").sum(), (grad, W_dec))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_cpu_results_do_not_depend_on_the_thread_count():
    code = make_codes((300,), 16, 16, 8, 500, dtype=torch.float32)
    grad, W_dec = randn(300, 64, dtype=torch.float32), randn(500, 64, dtype=torch.float32)
    edge_args = make_edge_inputs(300, 16, 16, 500, 400, 64, torch.float32)
    threads = torch.get_num_threads()
    runs = []
    try:
        for count in (1, max(threads, 2)):
            torch.set_num_threads(count)
            runs.append([*ops.latent_attribution(*code, grad, W_dec), ops.error_attribution(grad, grad * 2, grad),
                         *ops.feature_edges(*edge_args, 5, None), *ops.feature_edges(*edge_args, None, 0.1),
                         interpkernels.latent_attribution(*code, grad, W_dec, reduce="sum")])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_cpu_isas_give_the_same_bits():
    code = make_codes((40,), 8, 8, 4, 100, dtype=torch.float32)
    grad, W_dec = randn(40, 77, dtype=torch.float32), randn(100, 77, dtype=torch.float32)
    edge_args = make_edge_inputs(40, 8, 8, 100, 90, 77, torch.float32)
    previous, runs = interpkernels.cpu_isa(), []
    try:
        for isa in interpkernels.supported_cpu_isas():
            interpkernels.set_cpu_isa(isa)
            runs.append([*ops.latent_attribution(*code, grad, W_dec), ops.error_attribution(grad, W_dec[:40], grad),
                         *ops.feature_edges(*edge_args, 3, 0.1)])
    finally:
        interpkernels.set_cpu_isa(previous)
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)


def opcheck_samples():
    torch.manual_seed(0)  # runs at collection, before the seeding fixture
    code = make_codes((7,), 3, 4, 2, 20, dtype=torch.float32)
    grad, W_dec = torch.randn(7, 6), torch.randn(20, 6)
    edge_args = make_edge_inputs(7, 4, 3, 20, 15, 6, torch.float32)
    yield ops.latent_attribution.default, (*code, grad, W_dec)
    yield ops.latent_attribution.default, (code[0].requires_grad_(), code[1], code[2], code[3],
                                           grad.requires_grad_(), W_dec.requires_grad_())
    yield ops.error_attribution.default, (grad, torch.randn(7, 6, requires_grad=True), torch.randn(7, 6))
    yield ops.feature_edges.default, (*edge_args, 2, None)
    yield ops.feature_edges.default, (*(a.clone().requires_grad_() if a.is_floating_point() else a
                                        for a in edge_args), None, 0.5)


@pytest.mark.parametrize("op,args", list(opcheck_samples()), ids=lambda x: getattr(x, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def triton_opcheck_samples():
    code = [t.to(TRITON_DEVICE) for t in make_codes((5,), 3, 4, 2, 20, dtype=torch.float32)]
    grad = randn(5, 6, dtype=torch.float32, device=TRITON_DEVICE).requires_grad_()
    W_dec = randn(20, 6, dtype=torch.float32, device=TRITON_DEVICE).requires_grad_()
    edge_args = make_edge_inputs(5, 4, 3, 20, 15, 6, torch.float32, TRITON_DEVICE)
    yield ops.latent_attribution_triton.default, (code[0].requires_grad_(), code[1], code[2], code[3], grad, W_dec)
    yield ops.error_attribution_triton.default, (grad, grad.detach() * 2, grad.detach())
    yield ops.feature_edges_triton.default, (*(a.requires_grad_() if a.is_floating_point() else a for a in edge_args),
                                             2, 0.1)


def test_opcheck_triton_schema_and_fake(triton_as_on_gpu):
    if "triton" not in interpkernels.build_info()["backends"]:
        pytest.skip("triton is not usable here")
    for op, args in triton_opcheck_samples():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_opcheck_triton_with_autograd(triton_as_on_gpu):
    """The full opcheck (autograd registration, AOT dispatch): ~40 s under the interpreter."""
    if "triton" not in interpkernels.build_info()["backends"]:
        pytest.skip("triton is not usable here")
    for op, args in triton_opcheck_samples():
        torch.library.opcheck(op, args)


@pytest.mark.slow
def test_attribution_compiles_without_graph_breaks():
    """Scores and their gradients inside torch.compile(fullgraph=True), as eager."""
    torch._dynamo.reset()
    code = make_codes((2, 7), 4, 5, 2, 40, dtype=torch.float32)
    edge_args = make_edge_inputs(14, 4, 3, 40, 30, 16, torch.float32)

    def scores(grad, W_dec, clean_error, W_enc):
        latent = interpkernels.latent_attribution(*code, grad, W_dec, reduce="sum")
        error = interpkernels.error_attribution(clean_error, clean_error * 0.5, grad)
        values, _ = ops.feature_edges(edge_args[0], edge_args[1], W_dec, edge_args[3], W_enc, edge_args[5], 2, None)
        return latent.square().sum() + error.sum() + values.sum()

    compiled = torch.compile(scores, fullgraph=True)
    params = [torch.randn(2, 7, 16), torch.randn(40, 16), torch.randn(2, 7, 16), torch.randn(30, 16)]
    results = []
    for fn in (scores, compiled):
        leaves = [p.clone().requires_grad_() for p in params]
        out = fn(*leaves)
        results.append([out.detach(), *torch.autograd.grad(out, leaves)])
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-5)


def bad_latent_inputs():
    code = make_codes((5,), 3, 4, 1, 10, dtype=torch.float32)
    grad, W_dec = torch.randn(5, 6), torch.randn(10, 6)
    cv, ci, pv, pi = code
    yield (cv, ci, pv, pi[:, :3], grad, W_dec), {}, ValueError, "patched_indices"
    yield (cv, ci.float(), pv, pi, grad, W_dec), {}, TypeError, "clean_indices"
    yield (cv[:4], ci[:4], pv, pi, grad, W_dec), {}, ValueError, "clean_values"
    yield (cv, ci, pv, pi, grad, W_dec[:, :5]), {}, ValueError, "W_dec"
    yield (cv, ci, pv.double(), pi, grad, W_dec), {}, TypeError, "patched_values"
    yield (cv, ci, pv, pi, grad.to(torch.int32), W_dec), {}, TypeError, "grad"
    yield (cv, ci, pv, pi, grad, W_dec.to("meta")), {}, ValueError, "W_dec"
    yield (cv, ci + 10, pv, pi, grad, W_dec), {}, IndexError, "clean_indices"
    yield (cv, ci, pv, pi - 10, grad, W_dec), {}, IndexError, "patched_indices"
    yield (cv, ci, pv, pi, grad, W_dec), {"reduce": "max"}, ValueError, "reduce"
    yield (cv[:0], ci[:0], pv[:0], pi[:0], grad[:0], W_dec), {"reduce": "mean_abs"}, ValueError, "grad"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("args,kwargs,error,name", list(bad_latent_inputs()))
def test_latent_attribution_rejects_bad_input(backend, args, kwargs, error, name):
    with pytest.raises(error, match=name):
        interpkernels.latent_attribution(*args, backend=backend, **kwargs)


def bad_edge_inputs():
    src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale = make_edge_inputs(5, 4, 3, 20, 15, 6,
                                                                                            torch.float32)
    ok = [src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale]

    def with_(position, value):
        args = list(ok)
        args[position] = value
        return tuple(args)

    yield with_(1, src_indices[:, :3]), {}, ValueError, "src_indices"
    yield with_(3, dst_indices.float()), {}, TypeError, "dst_indices"
    yield with_(5, dst_scale[:4]), {}, ValueError, "dst_scale"
    yield with_(4, W_enc_dst[:, :5]), {}, ValueError, "W_enc_dst"
    yield with_(2, W_dec_src.half()), {}, TypeError, "W_dec_src"
    yield with_(1, src_indices + 20), {}, IndexError, "src_indices"
    yield with_(3, dst_indices - 15), {}, IndexError, "dst_indices"
    yield tuple(ok), {"top_k": 0}, ValueError, "top_k"
    yield tuple(ok), {"top_k": 2.5}, TypeError, "top_k"
    yield tuple(ok), {"threshold": float("nan")}, TypeError, "threshold"
    yield tuple(ok), {"reduce": "mean_abs"}, ValueError, "reduce"


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("args,kwargs,error,name", list(bad_edge_inputs()))
def test_feature_edges_rejects_bad_input(backend, args, kwargs, error, name):
    with pytest.raises(error, match=name):
        interpkernels.feature_edges(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_error_attribution_rejects_bad_input(backend):
    grad = torch.randn(4, 5)
    with pytest.raises(ValueError, match="patched_error"):
        interpkernels.error_attribution(grad, grad[:, :4], grad, backend=backend)
    with pytest.raises(TypeError, match="clean_error"):
        interpkernels.error_attribution(grad.double(), grad, grad, backend=backend)
    with pytest.raises(TypeError, match="grad"):
        interpkernels.error_attribution(grad, grad, grad.long(), backend=backend)


def test_raw_ops_check_their_arguments():
    """A direct torch.ops call with a bad argument raises, naming it, instead of reading out of bounds."""
    code = make_codes((5,), 3, 4, 1, 10, dtype=torch.float32)
    grad, W_dec = torch.randn(5, 6), torch.randn(10, 6)
    with pytest.raises(IndexError, match="patched_indices"):
        ops.latent_attribution(code[0], code[1], code[2], code[3] + 10, grad, W_dec)
    with pytest.raises(ValueError, match="clean_values"):
        ops.latent_attribution(code[0][:4], code[1][:4], code[2], code[3], grad, W_dec)
    edge_args = list(make_edge_inputs(5, 4, 3, 20, 15, 6, torch.float32))
    with pytest.raises(IndexError, match="dst_indices"):
        ops.feature_edges(*edge_args[:3], edge_args[3] + 15, *edge_args[4:], None, None)
    with pytest.raises(ValueError, match="top_k"):
        ops.feature_edges(*edge_args, 0, None)
    with pytest.raises(ValueError, match="grad"):
        ops.error_attribution(grad, grad, grad[:, :2])


def test_empty_inputs():
    code = make_codes((0,), 3, 4, 1, 10, dtype=torch.float32)
    grad, W_dec = torch.randn(0, 6), torch.randn(10, 6)
    assert interpkernels.latent_attribution(*code, grad, W_dec)._nnz() == 0
    assert torch.equal(interpkernels.latent_attribution(*code, grad, W_dec, reduce="sum"), torch.zeros(10))
    assert interpkernels.error_attribution(grad, grad, grad).shape == (0,)
    empty_code = make_codes((3,), 0, 0, 0, 10, dtype=torch.float32)
    assert torch.equal(interpkernels.latent_attribution(*empty_code, torch.randn(3, 6), W_dec, reduce="sum"),
                       torch.zeros(10))
    edges = interpkernels.feature_edges(*make_edge_inputs(0, 4, 3, 20, 15, 6, torch.float32), top_k=2)
    assert edges._nnz() == 0 and edges.shape == (0, 15, 20)
