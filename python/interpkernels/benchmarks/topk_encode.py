"""topk_encode benchmarks: ours against the reference (matmul + torch.topk,
the encoder of every peer), which materializes the [N, M] pre-activations;
on a GPU also against the GEMM alone (what a fused encoder cannot beat) and
EleutherAI sparsify's FusedEncoder when it is installed."""

from __future__ import annotations

import importlib.util

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case

IMPLEMENTATIONS = {
    "interpkernels": interpkernels.topk_encode,
    "reference (matmul+topk)": reference.topk_encode,
}


def gemm_alone(x, W_enc, b_enc, k, pre_bias):
    """The pre-activations only: the floor of any encoder that computes them all."""
    return (torch.addmm(b_enc, x - pre_bias, W_enc.T),)


def sparsify_fused_encoder(x, W_enc, b_enc, k, pre_bias):
    from sparsify.fused_encoder import fused_encoder

    return fused_encoder(x - pre_bias, W_enc, b_enc, k, "topk")[:1]


def gpu_implementations(mode: str) -> dict:
    implementations = dict(IMPLEMENTATIONS)
    if mode == "forward":  # the GEMM's own backward would be a different (dense) computation
        implementations["cuBLAS GEMM alone"] = gemm_alone
    if importlib.util.find_spec("sparsify") is not None:
        implementations["sparsify FusedEncoder"] = sparsify_fused_encoder
    return implementations


def cost(mode: str, dtype: torch.dtype, N, d, M, k) -> tuple[float, float]:
    """(GEMM FLOPs, bytes) of one call: the forward reads x and W_enc once and
    writes the code; the backward reads the code, x and the chosen rows of
    W_enc, and writes grad_x and the dense grad_W_enc."""
    size = torch.finfo(dtype).bits // 8
    flops = 2 * N * d * M
    moved = size * (N * d + M * d + M) + N * k * (size + 8)
    if mode == "fwd+bwd":
        flops += 4 * N * k * d
        moved += size * (N * k + 2 * N * d + min(N * k, M) * d + M * d + M) + 8 * N * k
    return flops, moved


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


def case(mode: str, dtype: torch.dtype, implementations: dict = IMPLEMENTATIONS, **shape) -> Case:
    return op_case("topk_encode", mode, shape, dtype, implementations, "reference (matmul+topk)", make_inputs, call,
                   cost(mode, dtype, **shape))


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("fwd+bwd", torch.float32, N=256, d=64, M=1024, k=8)]
    return [
        case("forward", torch.float32, N=4096, d=768, M=16384, k=32),
        case("forward", torch.float32, N=4096, d=768, M=65536, k=32),
        case("fwd+bwd", torch.float32, N=4096, d=768, M=16384, k=32),
    ]


def gpu_cases(quick: bool = False) -> list[Case]:
    """SPEC section 7's shapes at N = 16384: time against M and against k at d = 4096
    (k = 384 is AuxK's k_aux at d = 768, the two-pass path), against d, and the
    training step (fwd+bwd) at the issue's target shape, in bf16 and fp32."""
    if quick:
        return [case("forward", torch.bfloat16, gpu_implementations("forward"), N=2048, d=768, M=16384, k=32)]
    shapes = [dict(d=4096, M=M, k=32) for M in (16384, 65536, 131072)]
    shapes += [dict(d=4096, M=131072, k=k) for k in (64, 128, 384)]
    shapes += [dict(d=d, M=65536, k=32) for d in (768, 2304)]
    selected = [case("forward", torch.bfloat16, gpu_implementations("forward"), N=16384, **shape) for shape in shapes]
    for dtype in (torch.bfloat16, torch.float32):
        selected.append(case("fwd+bwd", dtype, gpu_implementations("fwd+bwd"), N=16384, d=4096, M=131072, k=32))
    selected.append(case("forward", torch.float32, gpu_implementations("forward"), N=16384, d=4096, M=131072, k=32))
    return selected
