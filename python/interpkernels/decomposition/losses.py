"""The losses of APD (Braun et al. 2025) and SPD (Bushnaq et al. 2025) over LinearComponents.

  faithfulness           sum_l ||W_target_l - sum_c P_c,l||^2 / (number of weights): the
                         components add up to the target.
  reconstruction         mean squared error between the outputs of a run through selected or
                         masked components and the target's: APD's minimality loss when the run
                         keeps the top-k components, SPD's stochastic reconstruction when it
                         runs masks m = g + (1 - g) r with r ~ U(0, 1) (stochastic_masks).
  simplicity             Schatten-p of the active components, summed over them and the layers,
                         mean over tokens (schatten_simplicity).
  importance minimality  SPD's sum_l sum_c g_c,l^p, mean over tokens: as few components causally
                         important per token as possible (importance_minimality).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from interpkernels import _validation as v
from interpkernels.decomposition.components import LinearComponents


def faithfulness_loss(layers: Iterable[LinearComponents]) -> torch.Tensor:
    """Mean squared entry of every layer's weight delta, over all layers' weights."""
    deltas = [layer.weight_delta() for layer in layers]
    return sum(delta.square().sum() for delta in deltas) / sum(delta.numel() for delta in deltas)


def reconstruction_loss(outputs: torch.Tensor, target_outputs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared error summed over output features."""
    return (outputs - target_outputs).square().sum(-1).mean()


def component_schatten_norms(layer: LinearComponents, p: float) -> torch.Tensor:
    """``[C]``: each component's Schatten-p norm to the power p, sum_r (||A[c,:,r]|| ||B[c,r]||)^p.
    Exact for rank 1 (one singular value); for rank m the pieces' norms, as APD approximates it."""
    if layer.rank == 1:
        sigma = layer.V.norm(dim=0) * layer.U.norm(dim=1)
    else:
        sigma = layer.V.norm(dim=1) * layer.U.norm(dim=2)  # [C, m]
    # (sigma^2 + eps)^(p/2): the gradient of sigma^p is infinite at 0 for p < 1.
    powered = (sigma.square() + 1e-12).pow(p / 2)
    return powered if layer.rank == 1 else powered.sum(-1)


def schatten_simplicity(layers: Iterable[LinearComponents], active: torch.Tensor, p: float = 0.9) -> torch.Tensor:
    """Mean over tokens of sum_c active[n, c] sum_l ||P_c,l||_p^p, ``active [..., C]`` the
    (top-k or SPD) mask; one [N, C] @ [C] product, fused over the mask."""
    v.require_float("active", active)
    norms = sum(component_schatten_norms(layer, p) for layer in layers)
    return (active.reshape(-1, active.shape[-1]).to(norms.dtype) @ norms).mean()


def stochastic_masks(importance: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """SPD's masks m = g + (1 - g) r, r ~ U(0, 1) per entry, for causal importances g in [0, 1]:
    an important component is always kept, an unimportant one at a random scale."""
    v.require_float("importance", importance)
    r = torch.rand(importance.shape, generator=generator, dtype=importance.dtype, device=importance.device)
    return importance + (1 - importance) * r


def importance_minimality(importances: Iterable[torch.Tensor], p: float = 1.0) -> torch.Tensor:
    """SPD's minimality: mean over tokens of sum_l sum_c g[n, c]^p, for each layer's causal
    importances ``g [..., C]`` (>= 0; clamped there, since the leaky gates dip below 0)."""
    total = None
    for g in importances:
        v.require_float("importances", g)
        # (g + eps)^p: the gradient of g^p is infinite at 0 for p < 1.
        term = (g.clamp(min=0) + 1e-12).pow(p).sum(-1).mean()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("importances: expected at least one layer's tensor, got none")
    return total
