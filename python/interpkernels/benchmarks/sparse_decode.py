"""sparse_decode benchmarks: ours against the dense formulation (the
reference: scatter into [N, M], matmul, autograd) and against F.embedding_bag
with per-sample weights (EleutherAI sparsify's eager decoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case


def embedding_bag_decode(values, indices, W_dec, bias):
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum") + bias


IMPLEMENTATIONS = {
    "interpkernels": interpkernels.sparse_decode,
    "reference (dense)": reference.sparse_decode,
    "embedding_bag": embedding_bag_decode,
}


def make_inputs(N, d, M, k, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    values = torch.rand(N, k, generator=generator).to(device, dtype)
    indices = torch.rand(N, M, generator=generator).argsort(dim=-1)[:, :k].to(device)
    W_dec = (torch.randn(M, d, generator=generator) / d**0.5).to(device, dtype)
    bias = torch.randn(d, generator=generator).to(device, dtype)
    grad_out = torch.randn(N, d, generator=generator).to(device, dtype)
    return values, indices, W_dec, bias, grad_out


def forward_case(N, d, M, k, dtype):
    def make(device):
        values, indices, W_dec, bias, _ = make_inputs(N, d, M, k, dtype, device)

        def bind(decode):
            def run():
                with torch.no_grad():
                    return decode(values, indices, W_dec, bias)
            return run

        return {name: bind(decode) for name, decode in IMPLEMENTATIONS.items()}

    return Case("sparse_decode", f"forward N={N} d={d} M={M} k={k} {str(dtype)[6:]}",
                dict(N=N, d=d, M=M, k=k, dtype=str(dtype)), make, "reference (dense)")


def training_case(N, d, M, k, dtype):
    def make(device):
        values, indices, W_dec, bias, grad_out = make_inputs(N, d, M, k, dtype, device)
        leaves = [t.requires_grad_() for t in (values, W_dec, bias)]

        def bind(decode):
            def run():
                out = decode(leaves[0], indices, leaves[1], leaves[2])
                return torch.autograd.grad(out, leaves, grad_out)
            return run

        return {name: bind(decode) for name, decode in IMPLEMENTATIONS.items()}

    return Case("sparse_decode", f"fwd+bwd N={N} d={d} M={M} k={k} {str(dtype)[6:]}",
                dict(N=N, d=d, M=M, k=k, dtype=str(dtype)), make, "reference (dense)")


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [training_case(256, 64, 1024, 8, torch.float32)]
    return [
        training_case(4096, 768, 16384, 32, torch.float32),
        forward_case(4096, 768, 16384, 32, torch.float32),
        training_case(4096, 768, 16384, 32, torch.bfloat16),
    ]
