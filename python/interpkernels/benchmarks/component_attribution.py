"""component_attribution benchmarks: ours against APD's way (one backward per
output, `calc_grad_attributions`) and the dense reference, which materializes
the [N, O, C] projections.

The per-output loop is given the same inputs: a layer output y = h @ U read by
a linear head whose Jacobian rows are G (out[n, o] = G[n, o] . y[n]), so each of
its O backwards does what APD's does at the layer, grad_h = G[:, o] @ U^T, and
adds (h * grad_h)^2. N is chosen per shape so that N O C d stays near 2^32
multiply-adds (at least 2 tokens): the CPU grid runs in minutes (the
per-output loop dominates: each of its O backwards touches the whole [N, O, d] head)."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case


def per_output_backward_loop(h, U, G):
    """APD's calc_grad_attributions at one layer: O backward passes."""
    with torch.enable_grad():
        leaf = h.detach().requires_grad_()
        out = (G * (leaf @ U).unsqueeze(-2)).sum(-1)  # [N, O]
        attributions = torch.zeros_like(h)
        for o in range(G.shape[-2]):
            (grad_h,) = torch.autograd.grad(out[..., o].sum(), leaf, retain_graph=True)
            attributions += (leaf.detach() * grad_h).square()
    return attributions


IMPLEMENTATIONS = {
    "interpkernels": interpkernels.component_attribution,
    "per-output backward (APD)": per_output_backward_loop,
    "reference (dense)": reference.component_attribution,
}


def tokens_for(C: int, O: int, d: int, budget: float = 2.0**32) -> int:
    return max(2, int(budget // (O * C * d)))


def make_inputs(device, dtype, N, C, O, d):
    """Component activations of O(1), unit-norm-ish components and Jacobian rows."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, C, generator=generator).to(device, dtype)
    U = (torch.randn(C, d, generator=generator) / d**0.5).to(device, dtype)
    G = (torch.randn(N, O, d, generator=generator) / d**0.5).to(device, dtype)
    return (h, U, G), torch.randn(N, C, generator=generator).to(device, dtype)


def call(attribution, inputs):
    return attribution(*inputs)


def case(mode: str, dtype: torch.dtype, **shape) -> Case:
    return op_case("component_attribution", mode, shape, dtype, IMPLEMENTATIONS, "per-output backward (APD)",
                   make_inputs, call)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("forward", torch.float32, N=8, C=256, O=16, d=64)]
    return [case("forward", torch.float32, N=tokens_for(C, O, d), C=C, O=O, d=d)
            for C in (1024, 8192) for O in (64, 1024) for d in (512, 2048)]
