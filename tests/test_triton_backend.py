"""The Triton backend through the public ops (backend="triton"): registered
ops with fake implementations and autograd whose backward also runs on
Triton, and the same errors as the C++ ops. Under the interpreter on CPU."""

import pytest
import torch
from devices import TRITON_DEVICE
from oracle import assert_matches_oracle

import interpkernels
from interpkernels import reference

pytest.importorskip("triton")
pytestmark = pytest.mark.usefixtures("triton_as_on_gpu")
ops = torch.ops.interpkernels


def leaves(*tensors):
    return [t.detach().clone().to(TRITON_DEVICE).requires_grad_() for t in tensors]


def grads(fn, inputs, grad_out):
    out = fn(*inputs)
    out.backward(grad_out.to(out.device))
    return [out.detach().cpu(), *(t.grad.cpu() for t in inputs)]


def test_encode_and_decode_with_gradients_match_reference():
    N, d, M, k = 5, 12, 40, 3
    x, W_enc, b_enc, pre_bias = torch.randn(N, d), torch.randn(M, d) / 4, torch.randn(M) / 5, torch.randn(d) / 5
    W_dec, b_dec = torch.randn(M, d), torch.randn(d)

    def sae(x, W_enc, b_enc, pre_bias, W_dec, b_dec, backend):
        values, indices = interpkernels.topk_encode(x, W_enc, b_enc, k, pre_bias=pre_bias, backend=backend)
        return interpkernels.sparse_decode(values, indices, W_dec, b_dec, backend=backend)

    grad_out = torch.randn(N, d)
    params = (x, W_enc, b_enc, pre_bias, W_dec, b_dec)
    ours = grads(lambda *a: sae(*a, backend="triton"), leaves(*params), grad_out)
    oracle = grads(lambda *a: sae(*a, backend="torch"), [t.double().requires_grad_() for t in params],
                   grad_out.double())
    for got, want in zip(ours, oracle):
        assert_matches_oracle(got, want)


def test_triton_ops_pass_opcheck():
    N, d, M, k = 4, 8, 20, 3
    device = TRITON_DEVICE
    x, W = torch.randn(N, d, device=device), torch.randn(M, d, device=device)
    indices = torch.rand(N, M).argsort(-1)[:, :k].to(device)
    values = torch.randn(N, k, device=device)
    torch.library.opcheck(ops.topk_encode_triton.default,
                          (x.requires_grad_(), W, torch.randn(M, device=device), k, None, None, None))
    torch.library.opcheck(ops.sparse_decode_triton.default, (values.requires_grad_(), indices, W, None))
    torch.library.opcheck(ops.gathered_dot_triton.default, (x, indices, W))
    torch.library.opcheck(ops.sparse_transpose_matmul_triton.default, (values, indices, x, M))
    torch.library.opcheck(ops.latent_grouping_triton.default, (indices, M))
    grouping = ops.latent_grouping_triton(indices, M)
    assert torch.equal(grouping.cpu(), ops.latent_grouping(indices.cpu(), M))  # one layout on every backend
    torch.library.opcheck(ops.grouped_transpose_matmul_triton.default,
                          (values, indices, x.detach().requires_grad_(), grouping))


def test_triton_backend_errors_like_the_cpp_ops():
    device = TRITON_DEVICE
    W = torch.randn(10, 4, device=device)
    values, indices = torch.randn(3, 2, device=device), torch.tensor([[0, 1], [2, 10], [3, 4]], device=device)
    with pytest.raises(IndexError, match=r"indices: expected every index in \[0, 10\), got values from 0 to 10"):
        interpkernels.sparse_decode(values, indices, W, backend="triton")
    with pytest.raises(ValueError, match="k: expected at most the 2 latents latent_mask keeps in, got 3"):
        interpkernels.topk_encode(torch.randn(3, 4, device=device), W, torch.zeros(10, device=device), 3,
                                  latent_mask=torch.arange(10, device=device) < 2, backend="triton")
    with pytest.raises(ValueError, match="backend: expected one of"):
        interpkernels.sparse_decode(values, indices.clamp(max=9), W, backend="fast")
    if device == "cpu":
        with pytest.raises(TypeError, match="the triton backend runs float32, bfloat16 and float16"):
            interpkernels.sparse_decode(values.double(), indices.clamp(max=9), W.double(), backend="triton")
        with pytest.raises(ValueError, match="backend: 'cuda' runs on cuda tensors, got tensors on cpu"):
            interpkernels.sparse_decode(values, indices.clamp(max=9), W, backend="cuda")


def test_auto_backend_reference_backend_and_default():
    values, indices = torch.randn(3, 2), torch.tensor([[0, 1], [2, 5], [3, 4]])
    W = torch.randn(6, 4)
    want = reference.sparse_decode(values, indices, W)
    for backend in ("auto", "cpu", "torch", None):
        torch.testing.assert_close(interpkernels.sparse_decode(values, indices, W, backend=backend), want)
