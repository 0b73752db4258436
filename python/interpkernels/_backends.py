"""Which implementation of an op runs: the ``backend=`` argument of every op.

    "auto"    the fastest available for the tensors' device: the C++ kernels
              on CPU; on CUDA the CUDA kernels where compiled, else Triton,
              else "torch" -- except topk_encode with k <= 256 on CUDA, which
              takes Triton's fused encoder over the CUDA two-pass one (which
              writes the [N, M] pre-activations; meant for large k). The
              256 is the fused kernel's design range, not yet a measured
              crossover.
    "cpu"     the C++ CPU kernels (CPU tensors)
    "cuda"    the CUDA C++ kernels (CUDA tensors; needs a CUDA build), or ATen's
              for masked_component_forward (GEMMs on cuBLAS)
    "triton"  the Triton kernels (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)
    "torch"   interpkernels.reference: dense pure PyTorch, any device

The default is "auto", or INTERPKERNELS_BACKEND as read at import.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from interpkernels import _C  # noqa: F401  (registers the C++ ops, whose CUDA kernels are looked up below)

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
# Which registered ops run on CUDA in this build (a CUDA kernel, or device-generic ATen
# code: masked_component_forward), read from the dispatcher once: dispatcher queries
# inside a torch.compile'd region would break the graph.
_CUDA_KERNELS = {
    name.removeprefix("interpkernels::"): any(torch._C._dispatch_has_kernel_for_dispatch_key(name, key)
                                              for key in ("CUDA", "CompositeExplicitAutograd"))
    for name in torch._C._dispatch_get_all_op_names() if name.startswith("interpkernels::")
}
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _check(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    return backend


DEFAULT_BACKEND = _check(os.environ.get("INTERPKERNELS_BACKEND", "auto"))


def triton_usable(device: torch.device) -> bool:
    return _TRITON_INSTALLED and (device.type == "cuda" or (device.type == "cpu" and _TRITON_INTERPRETED))


FUSED_TOPK_MAX_K = 256


def resolve(op: str, backend: str | None, device: torch.device, *, k: int | None = None) -> str:
    """The concrete backend for `op` on `device` (k: topk_encode's), or a ValueError naming why not."""
    backend = _check(DEFAULT_BACKEND if backend is None else backend)
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if op == "topk_encode" and device.type == "cuda" and triton_usable(device) and k is not None \
                and k <= FUSED_TOPK_MAX_K:
            return "triton"
        if device.type == "cuda" and _CUDA_KERNELS.get(op, False):
            return "cuda"
        return "triton" if triton_usable(device) else "torch"
    if backend in ("cpu", "cuda") and device.type != backend:
        raise ValueError(f"backend: {backend!r} runs on {backend} tensors, got tensors on {device}")
    if backend == "cuda" and not _CUDA_KERNELS.get(op, False):
        raise ValueError(f"backend: 'cuda' has no kernel for {op} in this build (interpkernels.build_info())")
    if backend == "triton" and not triton_usable(device):
        raise ValueError(f"backend: 'triton' needs triton installed and CUDA tensors (or TRITON_INTERPRET=1 on "
                         f"CPU), got tensors on {device}")
    return backend
