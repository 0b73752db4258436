"""jumprelu_encode benchmarks: ours (the fused encoder ranking latents above
their own threshold, at most max_l0 per row) against the dense reference
(pre-activations [N, M], then pre * 1[pre > threshold]), as a JumpReLU SAE
computes its code in SAELens or dictionary_learning."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case


def sparse_jumprelu(x, W_enc, b_enc, fixed, max_l0, pre_bias):
    return interpkernels.jumprelu_encode(x, W_enc, b_enc, fixed["threshold"], max_l0, pre_bias=pre_bias)[0]


def dense_jumprelu(x, W_enc, b_enc, fixed, max_l0, pre_bias):
    return reference.jumprelu(x, W_enc, b_enc, fixed["threshold"], pre_bias=pre_bias)


IMPLEMENTATIONS = {"interpkernels": sparse_jumprelu, "reference (dense)": dense_jumprelu}


def make_inputs(device, dtype, N, d, M, max_l0):
    """Thresholds that leave about max_l0 / 8 latents active per row, so the code never hits its cap.
    They are held fixed (in a dict, which the harness does not differentiate): the dense
    formulation has no threshold gradient to compare with."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, d, generator=generator).to(device, dtype)
    W_enc = (torch.randn(M, d, generator=generator) / d**0.5).to(device, dtype)
    b_enc = (0.1 * torch.randn(M, generator=generator)).to(device, dtype)
    pre_bias = (0.1 * torch.randn(d, generator=generator)).to(device, dtype)
    quantile = 1 - max_l0 / (8 * M)
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(quantile)) * torch.ones(M)
    fixed = {"threshold": threshold.to(device, dtype)}
    return (x, W_enc, b_enc, fixed, max_l0, pre_bias), torch.tensor(1.0, device=device)


def call(encode, inputs):
    """The sum of squared activations: one scalar, so both formulations take the same gradient."""
    return encode(*inputs).float().square().sum()


def case(mode: str, dtype: torch.dtype, **shape) -> Case:
    return op_case("jumprelu_encode", mode, shape, dtype, IMPLEMENTATIONS, "reference (dense)", make_inputs, call)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("fwd+bwd", torch.float32, N=256, d=64, M=1024, max_l0=16)]
    return [
        case("forward", torch.float32, N=4096, d=768, M=16384, max_l0=64),
        case("fwd+bwd", torch.float32, N=4096, d=768, M=16384, max_l0=64),
    ]
