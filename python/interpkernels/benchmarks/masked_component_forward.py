"""masked_component_forward benchmarks: SPD's masked forward and backward
through a decomposed linear layer (x @ V = h, mask in [0, 1], the weight
delta on), ours against autograd of the literal formula (reference), which
saves h * mask and x @ W_delta^T for the backward where ours saves only its
inputs. Both are GEMM-bound (four GEMMs of N C d and two of N d^2 per step):
the comparison is of what each adds around them, in time and peak memory.

N is chosen per shape so that N C d stays near 2^30 (at least 64 tokens)."""

from __future__ import annotations

import functools

import torch

from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case
from interpkernels.ops.masked_component_forward import masked_component_forward


def _ours(x, h, mask, U, W_delta, delta_mask, bias, backend=None):
    """The op with the reference's positional arguments."""
    return masked_component_forward(x, h, mask, U, W_delta=W_delta, delta_mask=delta_mask, bias=bias, backend=backend)


IMPLEMENTATIONS = {"interpkernels": _ours, "reference (autograd)": reference.masked_component_forward}
# On CUDA "interpkernels" (auto) is the native op on cuBLAS; the fused Triton kernel runs beside it.
GPU_IMPLEMENTATIONS = {**IMPLEMENTATIONS, "interpkernels (triton)": functools.partial(_ours, backend="triton")}


def tokens_for(C: int, d: int, budget: float = 2.0**30) -> int:
    return max(64, int(budget // (C * d)))


def make_inputs(device, dtype, N, C, d):
    """A square layer (d_in = d_out = d): activations, rank-1 components, SPD's masks in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, d, generator=generator)
    V = torch.randn(d, C, generator=generator) / d**0.5
    U = torch.randn(C, d, generator=generator) / C**0.5
    W_delta = torch.randn(d, d, generator=generator) / d**0.5
    mask, delta_mask, bias = torch.rand(N, C, generator=generator), torch.rand(N, generator=generator), \
        torch.randn(d, generator=generator)
    inputs = tuple(t.to(device, dtype) for t in (x, x @ V, mask, U, W_delta, delta_mask, bias))
    return inputs, torch.randn(N, d, generator=generator).to(device, dtype)


def call(forward, inputs):
    return forward(*inputs)


def cost(mode: str, dtype: torch.dtype, N, C, d) -> tuple[float, float]:
    """(GEMM FLOPs, bytes) of one call: the forward's two GEMMs read every input
    once and write y; the backward's four more read grad_y and write a gradient
    of the size of every input."""
    size = torch.finfo(dtype).bits // 8
    flops = 2 * N * (C * d + d * d)
    inputs = N * d + 2 * N * C + C * d + d * d + N + d  # x, h, mask, U, W_delta, delta_mask, bias
    moved = size * (inputs + N * d)
    if mode == "fwd+bwd":
        flops *= 3
        moved += size * (inputs + N * d + inputs)
    return flops, moved


def case(mode: str, dtype: torch.dtype, implementations: dict = IMPLEMENTATIONS, **shape) -> Case:
    return op_case("masked_component_forward", mode, shape, dtype, implementations, "reference (autograd)",
                   make_inputs, call, cost(mode, dtype, **shape))


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("fwd+bwd", torch.float32, N=16, C=64, d=32)]
    return [case(mode, torch.float32, N=tokens_for(C, d), C=C, d=d)
            for mode in ("forward", "fwd+bwd") for C in (1024, 8192) for d in (512, 2048)]


def gpu_cases(quick: bool = False) -> list[Case]:
    """The same grid at N = 16384 tokens, bf16 and fp32, with the Triton kernel."""
    if quick:
        return [case("fwd+bwd", torch.bfloat16, GPU_IMPLEMENTATIONS, N=2048, C=1024, d=512)]
    return [case(mode, dtype, GPU_IMPLEMENTATIONS, N=16384, C=C, d=d)
            for mode in ("forward", "fwd+bwd") for dtype in (torch.bfloat16, torch.float32)
            for C in (1024, 8192) for d in (512, 2048)]
