"""How the data-dependent checks run (interpkernels.index_check): on the host
with precise errors, or as device-side assertions that need no host sync."""

import pytest
import torch
from processes import run_python

import interpkernels

BACKENDS = ["cpu", "torch"] + (["triton"] if "triton" in interpkernels.build_info()["backends"] else [])


@pytest.fixture
def index_check():
    """Sets a mode for one test, restoring the previous one after."""
    previous = interpkernels.index_check()
    yield interpkernels.set_index_check
    interpkernels.set_index_check(previous)


def bad_code():
    W_dec = torch.randn(10, 4)
    values = torch.randn(3, 2)
    indices = torch.tensor([[0, 1], [2, 10], [3, 4]])
    return values, indices, W_dec


def test_auto_is_the_default_and_checks_cpu_tensors_on_the_host():
    assert interpkernels.index_check() == "auto"
    assert interpkernels.build_info()["index_check"] == "auto"
    with pytest.raises(IndexError, match=r"indices: expected every index in \[0, 10\), got values from 0 to 10"):
        interpkernels.sparse_decode(*bad_code())


@pytest.mark.parametrize("backend", BACKENDS)
def test_async_mode_raises_from_a_device_side_assertion_naming_the_argument(backend, index_check):
    """On CPU the assertion fires at once; on CUDA at the next sync. Either way
    the message names the argument and says how to get the values."""
    index_check("async")
    with pytest.raises(RuntimeError, match=r"indices: expected every index in \[0, 10\) \(a device-side check") as raised:
        interpkernels.sparse_decode(*bad_code(), backend=backend)
    assert "INTERPKERNELS_INDEX_CHECK=sync" in str(raised.value)
    values, indices, W_dec = bad_code()
    indices[1, 1] = 9
    assert torch.allclose(interpkernels.sparse_decode(values, indices, W_dec, backend=backend),
                          interpkernels.reference.sparse_decode(values, indices, W_dec), atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_async_mode_checks_the_latent_mask_count(backend, index_check):
    index_check("async")
    x, W_enc, b_enc = torch.randn(4, 6), torch.randn(10, 6), torch.randn(10)
    with pytest.raises(RuntimeError, match="k: expected at most as many latents as latent_mask keeps in, got 4"):
        interpkernels.topk_encode(x, W_enc, b_enc, 4, latent_mask=torch.arange(10) < 3, backend=backend)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_sync_mode_names_the_kept_count(backend, index_check):
    index_check("sync")
    x, W_enc, b_enc = torch.randn(4, 6), torch.randn(10, 6), torch.randn(10)
    with pytest.raises(ValueError, match="k: expected at most the 3 latents latent_mask keeps in, got 4"):
        interpkernels.topk_encode(x, W_enc, b_enc, 4, latent_mask=torch.arange(10) < 3, backend=backend)


def test_unknown_mode_is_refused(index_check):
    with pytest.raises(ValueError, match="expected 'auto', 'sync' or 'async', got 'lazy'"):
        index_check("lazy")
    assert interpkernels.index_check() == "auto"


def test_environment_variable_sets_the_mode_at_import():
    done = run_python("import interpkernels; print(interpkernels.index_check())", INTERPKERNELS_INDEX_CHECK="sync")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "sync"
    done = run_python("import interpkernels", INTERPKERNELS_INDEX_CHECK="never")
    assert done.returncode != 0 and "ValueError" in done.stderr and "got 'never'" in done.stderr


def test_the_suite_poisons_outputs():
    """conftest.py sets INTERPKERNELS_POISON_OUTPUTS=1: outputs start as NaN or
    the lowest int64, so a kernel that skips an element fails its test."""
    from interpkernels._outputs import POISON_OUTPUTS, new_output

    assert POISON_OUTPUTS
    assert new_output(2, 3, dtype=torch.bfloat16, device=torch.device("cpu")).isnan().all()
    assert (new_output(4, dtype=torch.int64, device=torch.device("cpu")) == torch.iinfo(torch.int64).min).all()
