"""How backend="auto" (and explicit backends) resolve, per op, device and k.
Pure logic: a CUDA device object needs no GPU."""

import pytest
import torch

from interpkernels import _backends

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_on_cpu_is_the_cpp_kernels():
    assert _backends.resolve("topk_encode", "auto", CPU, k=32) == "cpu"
    assert _backends.resolve("fvu", None, CPU) == "cpu"


def test_auto_on_cuda_prefers_cuda_kernels_but_the_fused_encoder_for_small_k(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(_backends, "_CUDA_KERNELS", {"topk_encode": True, "sparse_decode": True, "fvu": False})
    assert _backends.resolve("topk_encode", "auto", CUDA, k=_backends.FUSED_TOPK_MAX_K) == "triton"
    assert _backends.resolve("topk_encode", "auto", CUDA, k=_backends.FUSED_TOPK_MAX_K + 1) == "cuda"
    assert _backends.resolve("sparse_decode", "auto", CUDA) == "cuda"
    assert _backends.resolve("fvu", "auto", CUDA) == "triton"  # no CUDA kernel: the Triton one


def test_auto_without_kernels_or_triton_is_the_reference(monkeypatch):
    monkeypatch.setattr(_backends, "_CUDA_KERNELS", {})
    monkeypatch.setattr(_backends, "_TRITON_INSTALLED", False)
    assert _backends.resolve("sparse_decode", "auto", CUDA) == "torch"
    with pytest.raises(ValueError, match="backend: 'triton' needs triton installed"):
        _backends.resolve("sparse_decode", "triton", CUDA)
    with pytest.raises(ValueError, match="backend: 'cuda' has no kernel for sparse_decode"):
        _backends.resolve("sparse_decode", "cuda", CUDA)
