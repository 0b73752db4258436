"""sparse_decode benchmarks: ours against the dense formulation (the
reference: scatter into [N, M], matmul, autograd) and against F.embedding_bag
with per-sample weights (EleutherAI sparsify's eager decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case


def embedding_bag_decode(values, indices, W_dec, bias):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + bias


IMPLEMENTATIONS = {
    "interpkernels": interpkernels.sparse_decode,
    "reference (dense)": reference.sparse_decode,
    "embedding_bag": embedding_bag_decode,
}


def make_inputs(device, dtype, N, d, M, k):
    """A code with k distinct latents per row, decoder rows of norm ~1, and the output gradient."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    values = torch.rand(N, k, generator=generator).to(device, dtype)
    indices = torch.rand(N, M, generator=generator).argsort(dim=-1)[:, :k].to(device)
    W_dec = (torch.randn(M, d, generator=generator) / d**0.5).to(device, dtype)
    bias = torch.randn(d, generator=generator).to(device, dtype)
    grad_out = torch.randn(N, d, generator=generator).to(device, dtype)
    return (values, indices, W_dec, bias), grad_out


def call(decode, inputs):
    return decode(*inputs)


def case(mode: str, dtype: torch.dtype, **shape) -> Case:
    return op_case("sparse_decode", mode, shape, dtype, IMPLEMENTATIONS, "reference (dense)", make_inputs, call)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("fwd+bwd", torch.float32, N=256, d=64, M=1024, k=8)]
    return [
        case("fwd+bwd", torch.float32, N=4096, d=768, M=16384, k=32),
        case("forward", torch.float32, N=4096, d=768, M=16384, k=32),
        case("fwd+bwd", torch.bfloat16, N=4096, d=768, M=16384, k=32),
    ]
