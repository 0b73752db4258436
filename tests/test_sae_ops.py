"""The SAE-variant ops built on the fused kernels: batch_topk_encode,
jumprelu_encode and multi_target_decode, against dense references."""

import pytest
import torch
from devices import backends_and_devices
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


@pytest.mark.parametrize("backend,device", backends_and_devices())
def test_jumprelu_ranks_only_latents_above_their_threshold(backend, device):
    # pre = [5, 3], threshold = [10, 1], max_l0 = 1: latent 1 (3 > 1) is the answer,
    # though latent 0 has the larger pre-activation.
    values, indices = interpkernels.jumprelu_encode(
        torch.tensor([[5.0, 3.0]], device=device), torch.eye(2, device=device), torch.zeros(2, device=device),
        torch.tensor([10.0, 1.0], device=device), 1, backend=backend)
    assert indices.tolist() == [[1]] and values.tolist() == [[3.0]]


@pytest.mark.parametrize("backend,device", backends_and_devices())
def test_jumprelu_with_max_l0_below_m_is_exact_until_the_cap(backend, device):
    """Mixed thresholds, max_l0 < M: rows with at most max_l0 latents above
    threshold match the dense reference exactly; rows with more keep their
    max_l0 largest, and rows_at_cap counts exactly the rows whose slots are all
    active."""
    d, M, max_l0 = 10, 80, 5
    x = torch.randn(60, d) * torch.linspace(0.2, 3, 60)[:, None]  # few to many latents above threshold
    W, b, pre_bias = (t.float() for t in encoder(d, M))
    threshold = 0.5 + torch.rand(M) * torch.tensor([1.0, 2.0, 4.0]).repeat_interleave(M // 3 + 1)[:M]
    values, indices = interpkernels.jumprelu_encode(*(t.to(device) for t in (x, W, b, threshold)), max_l0,
                                                    pre_bias=pre_bias.to(device), backend=backend)
    values, indices = values.cpu(), indices.cpu()
    dense = reference.jumprelu(x.double(), W.double(), b.double(), threshold.double(), pre_bias=pre_bias.double())
    active = (dense > 0).sum(-1)
    capped = active >= max_l0
    assert capped.any() and (~capped).any() and (active > max_l0).any()
    assert rows_at_cap(values) == capped.sum()
    ours = reference.densify(values, indices, M)
    assert_matches_oracle(ours[~capped], dense[~capped])
    assert_matches_oracle(values[capped], dense[capped].topk(max_l0, dim=-1).values)


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
