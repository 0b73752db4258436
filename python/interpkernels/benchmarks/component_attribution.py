"""component_attribution benchmarks: ours against APD's way (one backward per
output, `calc_grad_attributions`) and the dense reference, which materializes
the [N, O, C] projections.

The per-output loop is given the same inputs: each layer's output y_l = h_l @ U_l
read by a linear head whose Jacobian rows are G_l (out[n, o] = sum_l G_l[n, o] .
y_l[n]), so each of its O backwards does what APD's does at the layers,
grad_h_l = G_l[:, o] @ U_l^T, and adds (sum_l h_l * grad_h_l)^2. N is chosen per
shape so that N O C d stays near 2^32 multiply-adds per layer (at least 2
tokens): the CPU grid runs in minutes (the per-output loop dominates: each of
its O backwards touches the whole [N, O, d] head). With layers=2 the layers
are passed as lists, d wide each."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case


def per_output_backward_loop(h, U, G):
    """APD's calc_grad_attributions: O backward passes; per output the layers' terms added, then squared."""
    if isinstance(h, torch.Tensor):
        h, U, G = [h], [U], [G]
    with torch.enable_grad():
        leaves = [layer_h.detach().requires_grad_() for layer_h in h]
        out = sum((layer_G * (leaf @ layer_U).unsqueeze(-2)).sum(-1)
                  for leaf, layer_U, layer_G in zip(leaves, U, G))  # [N, O]
        attributions = torch.zeros_like(h[0])
        for o in range(G[0].shape[-2]):
            grads = torch.autograd.grad(out[..., o].sum(), leaves, retain_graph=True)
            attributions += sum(leaf.detach() * grad_h for leaf, grad_h in zip(leaves, grads)).square()
    return attributions


IMPLEMENTATIONS = {
    "interpkernels": interpkernels.component_attribution,
    "per-output backward (APD)": per_output_backward_loop,
    "reference (dense)": reference.component_attribution,
}


def tokens_for(C: int, O: int, d: int, budget: float = 2.0**32) -> int:
    return max(2, int(budget // (O * C * d)))


def make_inputs(device, dtype, N, C, O, d, layers=1):
    """Component activations of O(1), unit-norm-ish components and Jacobian rows; lists of one
    per layer when layers > 1."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    per_layer = [(torch.randn(N, C, generator=generator).to(device, dtype),
                  (torch.randn(C, d, generator=generator) / d**0.5).to(device, dtype),
                  (torch.randn(N, O, d, generator=generator) / d**0.5).to(device, dtype)) for _ in range(layers)]
    inputs = per_layer[0] if layers == 1 else tuple(list(tensors) for tensors in zip(*per_layer))
    return inputs, torch.randn(N, C, generator=generator).to(device, dtype)


def call(attribution, inputs):
    return attribution(*inputs)


def case(mode: str, dtype: torch.dtype, **shape) -> Case:
    return op_case("component_attribution", mode, shape, dtype, IMPLEMENTATIONS, "per-output backward (APD)",
                   make_inputs, call)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("forward", torch.float32, N=8, C=256, O=16, d=64),
                case("forward", torch.float32, N=8, C=256, O=16, d=64, layers=2)]
    grid = [dict(N=tokens_for(C, O, d), C=C, O=O, d=d) for C in (1024, 8192) for O in (64, 1024) for d in (512, 2048)]
    return ([case("forward", torch.float32, **shape) for shape in grid]
            + [case("forward", torch.float32, **shape, layers=2) for shape in grid])
