"""What only a GPU can show: the GPU backends at shapes past their default
tile sizes in every dimension, and a whole TopKSAE + AuxK training step with
no host sync, captured in a CUDA graph. Skipped (and reported as such) on a
machine without a GPU; `docs/GPU.md` gives the command that runs them."""

import functools

import pytest
import torch
from devices import op_targets
from oracle import assert_matches_oracle, max_error

import interpkernels
from interpkernels import reference
from interpkernels.nn import TopKSAE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_TARGETS = [t for t in op_targets() if t.device == "cuda"]
# N past the fused encoder's row block, d past its 64-wide K tile, M >= 2**17 and not
# a multiple of 8, k on both sides of FUSED_TOPK_MAX_K (auto switches kernels there).
N, D, M = 4100, 300, 131101


@pytest.fixture(params=GPU_TARGETS, ids=str)
def gpu_target(request):
    return request.param


@pytest.mark.parametrize("k", (32, 300))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_topk_encode_past_every_default_tile(k, dtype, gpu_target):
    """Near-ties may rank differently than in float64 at this size, so the
    selection is checked for validity (its float64 pre-activations are the true
    top k within twice torch's own error), then values and gradients at it."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", generator=generator).to(dtype)
    W_enc = (torch.randn(M, D, device="cuda", generator=generator) / D**0.5).to(dtype)
    b_enc = (0.3 * torch.randn(M, device="cuda", generator=generator)).to(dtype)
    pre_bias = (0.5 * torch.randn(D, device="cuda", generator=generator)).to(dtype)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    values, indices = interpkernels.topk_encode(*leaves[:3], k, pre_bias=leaves[3], backend=gpu_target.backend)
    grad_values = torch.randn(N, k, device="cuda", generator=generator).to(dtype)
    values.backward(grad_values)

    pre64 = reference.pre_activations(x.double(), W_enc.double(), b_enc.double(), pre_bias.double())
    torch_error = max_error(reference.pre_activations(x, W_enc, b_enc, pre_bias), pre64)
    chosen = pre64.gather(-1, indices).sort(dim=-1, descending=True).values
    assert max_error(chosen, pre64.topk(k, dim=-1).values) <= 2 * torch_error
    del pre64, chosen

    params64 = [t.detach().double().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    oracle = reference.encode_at(*params64[:3], indices, pre_bias=params64[3])
    oracle.backward(grad_values.double())
    same_dtype = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, pre_bias)]
    torch_values = reference.encode_at(*same_dtype[:3], indices, pre_bias=same_dtype[3])
    torch_values.backward(grad_values)
    assert_matches_oracle(values, oracle.detach(), torch_values.detach())
    for got, want, torch_result in zip(leaves, params64, same_dtype):
        assert_matches_oracle(got.grad, want.grad, torch_result.grad)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_sparse_decode_past_every_default_tile(dtype, gpu_target):
    k, d = 300, 1000
    generator = torch.Generator(device="cuda").manual_seed(1)
    values = torch.randn(N, k, device="cuda", generator=generator).to(dtype)
    indices = torch.randint(0, M, (N, k), device="cuda", generator=generator)
    W_dec = torch.randn(M, d, device="cuda", generator=generator).to(dtype)
    bias = torch.randn(d, device="cuda", generator=generator).to(dtype)
    grad_out = torch.randn(N, d, device="cuda", generator=generator).to(dtype)

    def grads(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in (inputs[0], inputs[2], inputs[3])]
        out = fn(leaves[0], inputs[1], leaves[1], leaves[2])
        out.backward(inputs[4])
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    ours = grads(functools.partial(interpkernels.sparse_decode, backend=gpu_target.backend),
                 values, indices, W_dec, bias, grad_out)
    oracle = grads(reference.sparse_decode, values.double(), indices, W_dec.double(), bias.double(), grad_out.double())
    torch_same = grads(reference.sparse_decode, values, indices, W_dec, bias, grad_out)
    for got, want, torch_result in zip(ours, oracle, torch_same):
        assert_matches_oracle(got, want, torch_result if dtype != torch.float32 else None)


@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_masked_component_forward_past_every_tile(dtype, backend):
    """SPD's masked layer on cuBLAS (native) and the fused Triton kernel: N, C, d_in and
    d_out past its 64 x 64 x 32 tiles, the delta term on; values and every gradient."""
    C, d_in, d_out = 1031, 300, 1000
    generator = torch.Generator(device="cuda").manual_seed(2)

    def draw(*shape, scale=1.0):
        return (scale * torch.randn(*shape, device="cuda", generator=generator)).to(dtype)

    inputs = [draw(N, d_in), draw(N, C), torch.rand(N, C, device="cuda", generator=generator).to(dtype),
              draw(C, d_out, scale=C**-0.5), draw(d_out, d_in, scale=d_in**-0.5),
              torch.rand(N, device="cuda", generator=generator).to(dtype), draw(d_out)]
    grad_out = draw(N, d_out)

    def run(fn, tensors):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        out = fn(*leaves)
        out.backward(grad_out.to(out.dtype))
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    ours = run(lambda x, h, m, U, W, dm, b: interpkernels.masked_component_forward(
        x, h, m, U, W_delta=W, delta_mask=dm, bias=b, backend=backend), inputs)
    oracle = run(reference.masked_component_forward, [t.double() for t in inputs])
    torch_same = run(reference.masked_component_forward, inputs)
    for got, want, torch_result in zip(ours, oracle, torch_same):
        assert_matches_oracle(got, want, torch_result if dtype != torch.float32 else None)


def test_topk_sae_step_with_auxk_has_no_host_sync_and_replays_in_a_cuda_graph():
    """The training step of interpkernels.train, AuxK included, under
    set_sync_debug_mode("error") (a host sync raises), then captured in a CUDA
    graph: a replay must give what the same step gives eagerly."""
    torch.manual_seed(0)
    module = TopKSAE(64, 4096, 16, k_aux=32, seed=1).cuda()
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(512, 64, device="cuda")
    dead = torch.arange(4096, device="cuda") % 7 == 0

    def step():
        optimizer.zero_grad(set_to_none=False)
        out = module(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        loss.backward()
        module.remove_decoder_parallel_gradient_()
        optimizer.step()
        module.normalize_decoder_()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # compiles the Triton kernels and creates the optimizer state
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

    state = [t.detach().clone() for t in _step_state(module, optimizer)]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step()
    graph.replay()
    replayed = [captured_loss.clone(), *(t.detach().clone() for t in _step_state(module, optimizer))]

    for live, saved in zip(_step_state(module, optimizer), state):
        live.detach().copy_(saved)
    eager = [step(), *(t.detach().clone() for t in _step_state(module, optimizer))]
    for got, want in zip(replayed, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _step_state(module, optimizer):
    """Every tensor a training step reads and writes: parameters and Adam's state."""
    tensors = list(module.parameters())
    for parameter in module.parameters():
        tensors += [v for v in optimizer.state[parameter].values() if isinstance(v, torch.Tensor)]
    return tensors
