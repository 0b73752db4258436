"""The SAE-variant ops built on the fused kernels: batch_topk_encode,
jumprelu_encode and multi_target_decode, against dense references."""

import pytest
import torch
from oracle import assert_matches_oracle

import interpkernels
from interpkernels import reference
from interpkernels.ops.batch_topk_encode import rows_at_cap
from interpkernels.ops.jumprelu_encode import apply_threshold, jumprelu_l0


def encoder(d, M, dtype=torch.float64):
    return (torch.randn(M, d, dtype=dtype) / d**0.5, 0.2 * torch.randn(M, dtype=dtype),
            0.3 * torch.randn(d, dtype=dtype))


def test_batch_topk_matches_dense_reference_and_its_gradients():
    d, M, k = 12, 70, 3
    x = torch.randn(2, 9, d, dtype=torch.float64)
    W, b, pre_bias = encoder(d, M)
    values, indices = interpkernels.batch_topk_encode(x, W, b, k, max_per_row=M, pre_bias=pre_bias)
    dense = reference.densify(values, indices, M)
    assert_matches_oracle(dense, reference.batch_topk_encode(x, W, b, k, pre_bias=pre_bias))
    assert (values > 0).sum() == 2 * 9 * k  # N*k active over the batch
    assert (values > 0).sum(-1).unique().numel() > 1  # varying per row
    inputs = [t.clone().requires_grad_() for t in (x, W, b, pre_bias)]
    assert torch.autograd.gradcheck(
        lambda x, W, b, p: interpkernels.batch_topk_encode(x, W, b, k, max_per_row=M, pre_bias=p)[0], inputs)


def test_batch_topk_row_cap_is_reported():
    d, M, k = 4, 30, 2
    x = torch.randn(16, d, dtype=torch.float64)
    x[0] *= 100  # one row dominates the batch
    W, b, _ = encoder(d, M)
    values, _ = interpkernels.batch_topk_encode(x, W, b, k, max_per_row=3)
    assert values.shape == (16, 3)
    assert rows_at_cap(values) >= 1
    assert (values > 0).sum() <= 16 * k
    with pytest.raises(ValueError, match="max_per_row: expected 2 <= max_per_row"):
        interpkernels.batch_topk_encode(x, W, b, k, max_per_row=1)


def test_jumprelu_matches_dense_reference():
    d, M = 10, 40
    x = torch.randn(30, d, dtype=torch.float64)
    W, b, pre_bias = encoder(d, M)
    threshold = 0.2 + 0.3 * torch.rand(M, dtype=torch.float64)
    values, indices = interpkernels.jumprelu_encode(x, W, b, threshold, M, pre_bias=pre_bias)
    assert_matches_oracle(reference.densify(values, indices, M),
                          reference.jumprelu(x, W, b, threshold, pre_bias=pre_bias))
    inputs = [t.clone().requires_grad_() for t in (x, W, b)]
    assert torch.autograd.gradcheck(lambda x, W, b: interpkernels.jumprelu_encode(x, W, b, threshold, M)[0], inputs)


def test_jumprelu_threshold_gets_the_straight_through_gradient():
    bandwidth = 0.1
    candidates = torch.tensor([[0.52, 0.30, 0.95]], dtype=torch.float64)  # relu(pre) of a code
    indices = torch.tensor([[0, 1, 2]])
    threshold = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    values = apply_threshold(candidates, indices, threshold, bandwidth)
    assert torch.equal(values.detach(), torch.tensor([[0.52, 0.0, 0.95]], dtype=torch.float64))
    values.sum().backward()
    # -(theta/eps) * rect((pre - theta)/eps): only latent 0 lies within eps/2 of its threshold.
    assert torch.allclose(threshold.grad, torch.tensor([-5.0, 0.0, 0.0], dtype=torch.float64))
    threshold.grad = None
    jumprelu_l0(candidates, indices, threshold, bandwidth).backward()
    assert torch.allclose(threshold.grad, torch.tensor([-10.0, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("latent_major", [True, False])
def test_multi_target_decode_matches_per_target_decodes(latent_major):
    T, M, d, k = 3, 25, 7, 4
    storage = torch.randn(M, T, d, dtype=torch.float64) if latent_major else torch.randn(T, M, d, dtype=torch.float64)
    W_dec = storage.transpose(0, 1) if latent_major else storage
    bias = torch.randn(T, d, dtype=torch.float64)
    values = torch.randn(2, 5, k, dtype=torch.float64)
    indices = torch.randint(0, M, (2, 5, k))
    out = interpkernels.multi_target_decode(values, indices, W_dec, bias)
    assert out.shape == (T, 2, 5, d)
    for t in range(T):
        torch.testing.assert_close(out[t], reference.sparse_decode(values, indices, W_dec[t], bias[t]))
    leaves = [t.clone().requires_grad_() for t in (values, storage, bias)]

    def decode(v, s, b):
        return interpkernels.multi_target_decode(v, indices, s.transpose(0, 1) if latent_major else s, b)

    assert torch.autograd.gradcheck(decode, leaves)
