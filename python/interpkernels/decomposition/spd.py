"""SPD training (Bushnaq et al. 2025, stochastic parameter decomposition) of LinearComponents
attached to a frozen target model.

Where APD picks the top-k components by attribution (a hard, discrete choice that
a random start can lock in: components that are never picked only see the
faithfulness loss), SPD learns for each component and token a causal importance
g in [0, 1] and trains every component on every step through random masks:

  1. the target runs once (no graph); hooks capture each decomposed layer's input x_l;
  2. g_l = gate_l(h_l), h_l = x_l V_l: for each component a small MLP of its own
     activation h[n, c] (CausalImportance), through a hard sigmoid that leaks
     below 0 for the masks (a closed gate can reopen) and above 1 for the
     minimality loss (a gate pushed past 1 is pulled back);
  3. masks m = g + (1 - g) r, r ~ U(0, 1) (stochastic_masks): an important
     component is kept whole, any other at a random scale, so it must not matter;
  4. the model runs with every decomposed layer masked (masked_forward) and, once
     per layer, with only that layer masked;
  5. loss = faithfulness * w_f + (reconstruction(all masked) + mean over layers of
     reconstruction(one masked)) * w_r + importance_minimality(g, p) * w_i, one backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from interpkernels import _validation as v
from interpkernels._hooks import forward_hooks
from interpkernels.decomposition.components import LinearComponents
from interpkernels.decomposition.losses import (
    faithfulness_loss,
    importance_minimality,
    reconstruction_loss,
    stochastic_masks,
)
from interpkernels.decomposition.train import optimise


class CausalImportance(nn.Module):
    """Per component c, a one-hidden-layer MLP of the component's activation,
    ``z[n, c] = sum_j w2[c, j] gelu(w1[c, j] h[n, c] + b1[c, j]) + b2[c]``;
    the importances are hard sigmoids of z (``mask_importance``, ``minimality_importance``).
    Initialised from ``generator``: w1 ~ N(0, 1), w2 ~ N(0, 1/hidden), biases 0."""

    def __init__(self, num_components: int, hidden: int = 16, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        num_components = v.require_count("num_components", num_components, 1, 1 << 24, "2^24")
        hidden = v.require_count("hidden", hidden, 1, 1 << 16, "2^16")
        self.w1 = nn.Parameter(torch.randn(num_components, hidden, generator=generator))
        self.b1 = nn.Parameter(torch.zeros(num_components, hidden))
        self.w2 = nn.Parameter(torch.randn(num_components, hidden, generator=generator) * hidden**-0.5)
        self.b2 = nn.Parameter(torch.zeros(num_components))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``z [..., C]`` (before the hard sigmoid) from rank-1 component activations ``h [..., C]``."""
        v.require_float("h", h)
        if h.dim() < 1 or h.shape[-1] != self.w1.shape[0]:
            raise ValueError(f"h: expected shape [..., {self.w1.shape[0]}] (C of the gate), got {v.describe(h)}")
        hidden = torch.nn.functional.gelu(h.unsqueeze(-1) * self.w1 + self.b1)
        return (hidden * self.w2).sum(-1) + self.b2


def mask_importance(z: torch.Tensor, leak: float = 0.01) -> torch.Tensor:
    """clamp(z, 0, 1) with slope ``leak`` below 0: the gradient reopens a closed gate."""
    return torch.where(z < 0, leak * z, z.clamp(max=1))


def minimality_importance(z: torch.Tensor, leak: float = 0.01) -> torch.Tensor:
    """clamp(z, 0, 1) with slope ``leak`` above 1: the minimality loss pulls an over-open gate back."""
    return torch.where(z > 1, 1 + leak * (z - 1), z.clamp(min=0))


@dataclass
class SPDConfig:
    steps: int = 2000
    learning_rate: float = 2e-2  # cosine decay to 0
    faithfulness_weight: float = 1.0
    reconstruction_weight: float = 1.0  # on reconstruction_loss (summed over outputs; SPD's MSE is its mean)
    importance_weight: float = 3e-3
    importance_p: float = 1.0
    gate_hidden: int = 16
    log_every: int = 100


@dataclass
class SPDHistory:
    step: list[int] = field(default_factory=list)
    faithfulness: list[float] = field(default_factory=list)
    reconstruction: list[float] = field(default_factory=list)
    importance_minimality: list[float] = field(default_factory=list)


def causal_importances(model: nn.Module, layers: dict[str, LinearComponents], gates: dict[str, CausalImportance],
                       x: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Steps 1-2: ``(z per layer [..., C], each layer's input, the target's outputs)`` for batch x."""
    for name, layer in layers.items():
        if layer.rank != 1:
            raise ValueError(f"layers: CausalImportance gates rank-1 components; {name!r} has rank {layer.rank}")
    inputs: dict[str, torch.Tensor] = {}

    def capture(name):
        def hook(module, layer_inputs, output):
            inputs[name] = layer_inputs[0].detach()
        return hook

    with torch.no_grad(), forward_hooks(model, {name: capture(name) for name in layers}):
        target_out = model(x)
    z = {name: gates[name](layer.component_acts(inputs[name])) for name, layer in layers.items()}
    return z, inputs, target_out


def spd_losses(model: nn.Module, layers: dict[str, LinearComponents], gates: dict[str, CausalImportance],
               x: torch.Tensor, config: SPDConfig, generator: torch.Generator | None = None
               ) -> dict[str, torch.Tensor]:
    """Steps 1-4 of the module docstring for one batch ``x``: the three loss terms."""
    z, _, target_out = causal_importances(model, layers, gates, x)

    def run_masked(masks: dict[str, torch.Tensor]) -> torch.Tensor:
        def through(name):
            return lambda module, inputs, output: layers[name].masked_forward(inputs[0], masks[name])
        with forward_hooks(model, {name: through(name) for name in masks}):
            return model(x)

    importances = {name: mask_importance(value) for name, value in z.items()}
    all_masked = reconstruction_loss(run_masked(
        {name: stochastic_masks(g, generator=generator) for name, g in importances.items()}), target_out)
    layerwise = sum(reconstruction_loss(run_masked({name: stochastic_masks(g, generator=generator)}), target_out)
                    for name, g in importances.items()) / len(importances)
    return {
        "faithfulness": faithfulness_loss(layers.values()),
        "reconstruction": all_masked + layerwise,
        "importance_minimality": importance_minimality(
            [minimality_importance(value) for value in z.values()], config.importance_p),
    }


def train_spd(model: nn.Module, layers: dict[str, LinearComponents], gates: dict[str, CausalImportance],
              batches: Callable[[], torch.Tensor], config: SPDConfig, *, generator: torch.Generator | None = None,
              progress: bool = True) -> SPDHistory:
    """Trains the components of ``layers`` (submodule name -> LinearComponents) and their
    ``gates`` (same names) against the frozen ``model``, one ``batches()`` batch per step, with
    Adam and a cosine learning rate. A tqdm bar on a terminal, plain lines every ``log_every``
    steps elsewhere (progress=False: silent)."""
    if set(gates) != set(layers):
        raise ValueError(f"gates: expected one CausalImportance per layer {sorted(layers)}, got {sorted(gates)}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [p for module in (*layers.values(), *gates.values()) for p in module.parameters()]
    weights = {"faithfulness": config.faithfulness_weight, "reconstruction": config.reconstruction_weight,
               "importance_minimality": config.importance_weight}

    def learning_rate(step):
        return config.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - 1) / config.steps))

    return optimise(parameters, config.steps, learning_rate,
                    lambda: spd_losses(model, layers, gates, batches(), config, generator),
                    weights, SPDHistory(), config.log_every, progress)
