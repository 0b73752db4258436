"""topk_encode benchmarks: ours against the reference (matmul + torch.topk,
the encoder of every peer), which materializes the [N, M] pre-activations."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case

IMPLEMENTATIONS = {
    "interpkernels": interpkernels.topk_encode,
    "reference (matmul+topk)": reference.topk_encode,
}


def make_inputs(device, dtype, N, d, M, k):
    """Activations, an encoder with O(1) pre-activations, and a gradient for the values."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, d, generator=generator).to(device, dtype)
    W_enc = (torch.randn(M, d, generator=generator) / d**0.5).to(device, dtype)
    b_enc = (0.1 * torch.randn(M, generator=generator)).to(device, dtype)
    pre_bias = (0.1 * torch.randn(d, generator=generator)).to(device, dtype)
    grad_values = torch.randn(N, k, generator=generator).to(device, dtype)
    return (x, W_enc, b_enc, k, pre_bias), grad_values


def call(encode, inputs):
    x, W_enc, b_enc, k, pre_bias = inputs
    return encode(x, W_enc, b_enc, k, pre_bias=pre_bias)[0]


def case(mode: str, dtype: torch.dtype, **shape) -> Case:
    return op_case("topk_encode", mode, shape, dtype, IMPLEMENTATIONS, "reference (matmul+topk)", make_inputs, call)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("fwd+bwd", torch.float32, N=256, d=64, M=1024, k=8)]
    return [
        case("forward", torch.float32, N=4096, d=768, M=16384, k=32),
        case("forward", torch.float32, N=4096, d=768, M=65536, k=32),
        case("fwd+bwd", torch.float32, N=4096, d=768, M=16384, k=32),
    ]
