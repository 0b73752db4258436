"""remove_parallel_component_, normalize_rows_ and fvu (SPEC.md §3)."""

import pytest
import torch
from oracle import ALL_DTYPES, LOW_PRECISION, assert_matches_oracle

from interpkernels import reference
from interpkernels.ops.sae_training import fvu, normalize_rows_, remove_parallel_component_

ops = torch.ops.interpkernels


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 19), (4, 5, 129)])
def test_fvu_matches_reference(shape, dtype):
    target = (torch.randn(*shape, dtype=torch.float64) + 3.0).to(dtype)  # an offset mean: variance must centre
    reconstruction = (target.double() + 0.3 * torch.randn(*shape, dtype=torch.float64)).to(dtype)
    got = fvu(reconstruction, target)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    oracle = reference.fvu(reconstruction.double(), target.double())
    if shape[0] == 1:  # a single row has no variance: the ratio is inf or nan, as in torch
        assert not torch.isfinite(got) and not torch.isfinite(oracle)
        return
    # Inputs are already rounded to dtype and the kernel accumulates in float64,
    # so its float32 result meets the float32 rule whatever the input dtype.
    assert_matches_oracle(got, oracle)


def test_fvu_gradients_and_opcheck():
    reconstruction = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fvu, (reconstruction, target))
    torch.library.opcheck(ops.fvu.default, (reconstruction, target))
    torch.library.opcheck(ops.fvu.default, (torch.randn(9, 4), torch.randn(9, 4)))


def test_fvu_mixed_precision_and_backend_torch():
    target = torch.randn(20, 8)
    reconstruction = (target + 0.1 * torch.randn(20, 8)).bfloat16()
    torch.testing.assert_close(fvu(reconstruction, target), fvu(reconstruction, target, backend="torch"))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_row_normalization_and_gradient_projection(dtype):
    weight = (3 * torch.randn(33, 17, dtype=torch.float64)).to(dtype)
    grad = torch.randn(33, 17, dtype=torch.float64).to(dtype)
    want_grad, want_weight = grad.double().clone(), weight.double().clone()
    remove_parallel_component_(want_grad, want_weight, backend="torch")
    normalize_rows_(want_weight, backend="torch")
    torch_grad, torch_weight = grad.clone(), weight.clone()
    remove_parallel_component_(torch_grad, torch_weight, backend="torch")
    normalize_rows_(torch_weight, backend="torch")

    remove_parallel_component_(grad, weight)
    normalize_rows_(weight)
    low = dtype in LOW_PRECISION
    assert_matches_oracle(grad, want_grad, torch_grad if low else None)
    assert_matches_oracle(weight, want_weight, torch_weight if low else None)


def test_zero_rows_stay_zero_and_opcheck():
    weight = torch.randn(4, 6)
    weight[2] = 0
    grad = torch.randn(4, 6)
    before = grad[2].clone()
    remove_parallel_component_(grad, weight)
    normalize_rows_(weight)
    assert torch.equal(weight[2], torch.zeros(6)) and torch.equal(grad[2], before)
    torch.library.opcheck(ops.normalize_rows_.default, (torch.randn(5, 3),))
    torch.library.opcheck(ops.remove_parallel_component_.default, (torch.randn(5, 3), torch.randn(5, 3)))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"weight: expected a contiguous tensor of shape \[M, d\]"):
        normalize_rows_(torch.randn(6, 4).T)
    with pytest.raises(ValueError, match=r"weight: expected shape \[3, 4\] \(the shape of grad\)"):
        remove_parallel_component_(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        remove_parallel_component_(torch.randn(3, 4), torch.randn(3, 4).double())
    with pytest.raises(ValueError, match="reconstruction: expected shape"):
        fvu(torch.randn(3, 4), torch.randn(3, 5))
