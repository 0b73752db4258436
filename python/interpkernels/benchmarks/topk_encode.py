"""topk_encode benchmarks: ours against the reference (matmul + torch.topk,
the encoder of every peer), which materializes the [N, M] pre-activations."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case

IMPLEMENTATIONS = {
    "interpkernels": interpkernels.topk_encode,
    "reference (matmul+topk)": reference.topk_encode,
}


def make_inputs(N, d, M, dtype, device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(N, d, generator=generator).to(device, dtype)
    W_enc = (torch.randn(M, d, generator=generator) / d**0.5).to(device, dtype)
    b_enc = (0.1 * torch.randn(M, generator=generator)).to(device, dtype)
    pre_bias = (0.1 * torch.randn(d, generator=generator)).to(device, dtype)
    return x, W_enc, b_enc, pre_bias


def forward_case(N, d, M, k, dtype):
    def make(device):
        x, W_enc, b_enc, pre_bias = make_inputs(N, d, M, dtype, device)

        def bind(encode):
            def run():
                with torch.no_grad():
                    return encode(x, W_enc, b_enc, k, pre_bias=pre_bias)
            return run

        return {name: bind(encode) for name, encode in IMPLEMENTATIONS.items()}

    return Case("topk_encode", f"forward N={N} d={d} M={M} k={k} {str(dtype)[6:]}",
                dict(N=N, d=d, M=M, k=k, dtype=str(dtype)), make, "reference (matmul+topk)")


def training_case(N, d, M, k, dtype):
    def make(device):
        leaves = [t.requires_grad_() for t in make_inputs(N, d, M, dtype, device)]
        grad_values = torch.randn(N, k, generator=torch.Generator().manual_seed(1)).to(device, dtype)

        def bind(encode):
            def run():
                values, _ = encode(*leaves[:3], k, pre_bias=leaves[3])
                return torch.autograd.grad(values, leaves, grad_values)
            return run

        return {name: bind(encode) for name, encode in IMPLEMENTATIONS.items()}

    return Case("topk_encode", f"fwd+bwd N={N} d={d} M={M} k={k} {str(dtype)[6:]}",
                dict(N=N, d=d, M=M, k=k, dtype=str(dtype)), make, "reference (matmul+topk)")


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [training_case(256, 64, 1024, 8, torch.float32)]
    return [
        forward_case(4096, 768, 16384, 32, torch.float32),
        forward_case(4096, 768, 65536, 32, torch.float32),
        training_case(4096, 768, 16384, 32, torch.float32),
    ]
