"""remove_parallel_component_, normalize_rows_ and fvu (docs/OPS.md), on the
C++ CPU kernels and on the Triton kernels (under the interpreter without a GPU)."""

import pytest
import torch
from devices import TRITON_DEVICE
from oracle import ALL_DTYPES, LOW_PRECISION, assert_matches_oracle

from interpkernels import reference
from interpkernels.ops.sae_training import fvu, normalize_rows_, remove_parallel_component_

ops = torch.ops.interpkernels


# The C++ kernels take every dtype; the Triton kernels all but float64.
BACKEND_DTYPES = [("cpu", dtype) for dtype in ALL_DTYPES] + [("triton", dtype) for dtype in ALL_DTYPES[1:]]


@pytest.fixture(params=["cpu", "triton"])
def backend(request):
    return backend_and_device(request, request.param)


def backend_and_device(request, backend):
    """The C++ kernels run on CPU, the Triton kernels on their device."""
    if backend == "triton":
        request.getfixturevalue("triton_as_on_gpu")
        return "triton", TRITON_DEVICE
    return "cpu", "cpu"


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (37, 19), (4, 5, 129)])
def test_fvu_matches_reference(shape, backend, dtype, request):
    backend, device = backend_and_device(request, backend)
    target = (torch.randn(*shape, dtype=torch.float64) + 3.0).to(dtype)  # an offset mean: variance must centre
    reconstruction = (target.double() + 0.3 * torch.randn(*shape, dtype=torch.float64)).to(dtype)
    got = fvu(reconstruction.to(device), target.to(device), backend=backend).cpu()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    oracle = reference.fvu(reconstruction.double(), target.double())
    if shape[0] == 1:  # a single row has no variance: the ratio is inf or nan, as in torch
        assert not torch.isfinite(got) and not torch.isfinite(oracle)
        return
    # Inputs are already rounded to dtype and the kernel accumulates in float64,
    # so its float32 result meets the float32 rule whatever the input dtype.
    assert_matches_oracle(got, oracle)


def test_fvu_gradients_and_opcheck(triton_as_on_gpu):
    reconstruction = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fvu, (reconstruction, target))
    torch.library.opcheck(ops.fvu.default, (reconstruction, target))
    torch.library.opcheck(ops.fvu.default, (torch.randn(9, 4), torch.randn(9, 4)))
    pair = (torch.randn(9, 4, device=TRITON_DEVICE, requires_grad=True), torch.randn(9, 4, device=TRITON_DEVICE))
    torch.library.opcheck(ops.fvu_triton.default, pair)


def test_fvu_is_deterministic_across_thread_counts():
    """Partial sums over fixed chunks of rows, combined in order: the same bits
    whatever the number of threads (a run must be reproducible)."""
    reconstruction, target = torch.randn(3000, 50), torch.randn(3000, 50)
    threads = torch.get_num_threads()
    try:
        runs = []
        for count in (1, max(threads, 2), max(threads, 2)):
            torch.set_num_threads(count)
            runs.append(torch.ops.interpkernels.fvu(reconstruction, target))
    finally:
        torch.set_num_threads(threads)
    for fvu_value, variance in runs[1:]:
        assert torch.equal(fvu_value, runs[0][0]) and torch.equal(variance, runs[0][1])


def test_fvu_mixed_precision_and_backend_torch():
    target = torch.randn(20, 8)
    reconstruction = (target + 0.1 * torch.randn(20, 8)).bfloat16()
    torch.testing.assert_close(fvu(reconstruction, target), fvu(reconstruction, target, backend="torch"))


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES, ids=str)
def test_row_normalization_and_gradient_projection(backend, dtype, request):
    backend, device = backend_and_device(request, backend)
    weight = (3 * torch.randn(33, 17, dtype=torch.float64)).to(dtype)
    grad = torch.randn(33, 17, dtype=torch.float64).to(dtype)
    want_grad, want_weight = grad.double().clone(), weight.double().clone()
    remove_parallel_component_(want_grad, want_weight, backend="torch")
    normalize_rows_(want_weight, backend="torch")
    torch_grad, torch_weight = grad.clone(), weight.clone()
    remove_parallel_component_(torch_grad, torch_weight, backend="torch")
    normalize_rows_(torch_weight, backend="torch")

    grad, weight = grad.to(device), weight.to(device)
    remove_parallel_component_(grad, weight, backend=backend)
    normalize_rows_(weight, backend=backend)
    grad, weight = grad.cpu(), weight.cpu()
    low = dtype in LOW_PRECISION
    assert_matches_oracle(grad, want_grad, torch_grad if low else None)
    assert_matches_oracle(weight, want_weight, torch_weight if low else None)


def test_zero_rows_stay_zero_and_opcheck(backend):
    backend, device = backend
    weight = torch.randn(4, 6, device=device)
    weight[2] = 0
    grad = torch.randn(4, 6, device=device)
    before = grad[2].clone()
    remove_parallel_component_(grad, weight, backend=backend)
    normalize_rows_(weight, backend=backend)
    assert torch.equal(weight[2], torch.zeros(6, device=device)) and torch.equal(grad[2], before)
    in_place = {"cpu": (ops.normalize_rows_, ops.remove_parallel_component_),
                "triton": (ops.normalize_rows_triton_, ops.remove_parallel_component_triton_)}[backend]
    torch.library.opcheck(in_place[0].default, (torch.randn(5, 3, device=device),))
    torch.library.opcheck(in_place[1].default, (torch.randn(5, 3, device=device), torch.randn(5, 3, device=device)))


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"weight: expected a contiguous tensor of shape \[M, d\]"):
        normalize_rows_(torch.randn(6, 4).T)
    with pytest.raises(ValueError, match=r"weight: expected shape \[3, 4\] \(the shape of grad\)"):
        remove_parallel_component_(torch.randn(3, 4), torch.randn(4, 3))
    with pytest.raises(TypeError, match="weight: expected dtype float32"):
        remove_parallel_component_(torch.randn(3, 4), torch.randn(3, 4).double())
    with pytest.raises(ValueError, match="reconstruction: expected shape"):
        fvu(torch.randn(3, 4), torch.randn(3, 5))
