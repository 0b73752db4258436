"""sparse_decode benchmarks: ours against the dense formulation (the
reference: scatter into [N, M], matmul, autograd) and against F.embedding_bag
with per-sample weights (EleutherAI sparsify's eager decoder); on a GPU also
against sparsify's Triton decoder when it is installed."""

from __future__ import annotations

import importlib.util

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


def sparsify_triton_decode(values, indices, W_dec, bias):
    from sparsify.xformers import xformers_embedding_bag

    return xformers_embedding_bag(indices, W_dec, values) + bias


def gpu_implementations() -> dict:
    implementations = dict(IMPLEMENTATIONS)
    if importlib.util.find_spec("sparsify") is not None:
        implementations["sparsify Triton decoder"] = sparsify_triton_decode
    return implementations


def distinct_indices(N, M, k, device, generator, rows_per_chunk=1024):
    """k distinct latents per row, as a TopK code has them, drawn a chunk of rows at a time."""
    chunks = [torch.rand(min(rows_per_chunk, N - start), M, generator=generator).to(device).topk(k).indices
              for start in range(0, N, rows_per_chunk)]
    return torch.cat(chunks) if chunks else torch.empty(0, k, dtype=torch.int64, device=device)


def cost(mode: str, dtype: torch.dtype, N, d, M, k) -> tuple[float, float]:
    """(FLOPs, bytes) of one call: the forward reads the code and the rows it
    names (at most M of them) and writes [N, d]; the backward reads grad_out
    twice and those rows again, and writes grad_values and the dense grad_W_dec."""
    size = torch.finfo(dtype).bits // 8
    rows = min(N * k, M) * d * size
    flops = 2 * N * k * d
    moved = N * k * (size + 8) + rows + N * d * size
    if mode == "fwd+bwd":
        flops *= 3
        moved += 2 * N * d * size + rows + N * k * size + M * d * size
    return flops, moved


def make_inputs(device, dtype, N, d, M, k):
    """A code with k distinct latents per row, decoder rows of norm ~1, and the output gradient."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    values = torch.rand(N, k, generator=generator).to(device, dtype)
    indices = distinct_indices(N, M, k, device, generator)
    W_dec = (torch.randn(M, d, generator=generator) / d**0.5).to(device, dtype)
    bias = torch.randn(d, generator=generator).to(device, dtype)
    grad_out = torch.randn(N, d, generator=generator).to(device, dtype)
    return (values, indices, W_dec, bias), grad_out


def call(decode, inputs):
    return decode(*inputs)


def case(mode: str, dtype: torch.dtype, implementations: dict = IMPLEMENTATIONS, **shape) -> Case:
    return op_case("sparse_decode", mode, shape, dtype, implementations, "reference (dense)", make_inputs, call,
                   cost(mode, dtype, **shape))


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("fwd+bwd", torch.float32, N=256, d=64, M=1024, k=8)]
    return [
        case("fwd+bwd", torch.float32, N=4096, d=768, M=16384, k=32),
        case("forward", torch.float32, N=4096, d=768, M=16384, k=32),
        case("fwd+bwd", torch.bfloat16, N=4096, d=768, M=16384, k=32),
    ]


def gpu_cases(quick: bool = False) -> list[Case]:
    """SPEC section 7's shapes at N = 16384: time against M and against k at d = 4096, bf16 and fp32."""
    if quick:
        return [case("fwd+bwd", torch.bfloat16, gpu_implementations(), N=2048, d=768, M=16384, k=32)]
    shapes = [dict(d=4096, M=M, k=32) for M in (16384, 65536, 131072)]
    shapes += [dict(d=4096, M=131072, k=k) for k in (64, 128)]
    selected = [case(mode, torch.bfloat16, gpu_implementations(), N=16384, **shape)
                for mode in ("forward", "fwd+bwd") for shape in shapes]
    selected.append(case("fwd+bwd", torch.float32, gpu_implementations(), N=16384, d=4096, M=131072, k=32))
    return selected
