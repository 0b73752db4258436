"""APD training of LinearComponents attached to a frozen target model.

One step (Braun et al. 2025), with a constant number of backward calls,
whatever the numbers of outputs O and components C:
  1. the target runs once; hooks capture each decomposed layer's input x_l and
     make its output y_l a leaf, and output_jacobian_rows takes G_l for every
     layer in one batched backward (or P random probes: ``probes``);
  2. attributions A[n, c] = sum_o (sum_l s_l[n,o,c])^2, s_l the layer's term: one
     component_attribution call over the lists of every layer's h_l, U_l, G_l;
  3. the top-k (per token) or batch top-k components by A are selected;
  4. the model runs again with every decomposed layer replaced by its selected
     components (topk_forward: sparse_decode on gathered h);
  5. loss = faithfulness * w_f + reconstruction(top-k run, target) * w_r
            + schatten_simplicity(selected) * w_s, and one backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from interpkernels._hooks import forward_hooks
from interpkernels._nonfinite import NonFiniteWatch
from interpkernels._progress import Progress
from interpkernels.decomposition.components import LinearComponents
from interpkernels.decomposition.jacobian import output_jacobian_rows
from interpkernels.decomposition.losses import faithfulness_loss, reconstruction_loss, schatten_simplicity
from interpkernels.decomposition.selection import batch_topk_components, topk_components
from interpkernels.ops.component_attribution import component_attribution


@dataclass
class APDConfig:
    steps: int = 2000
    learning_rate: float = 1e-2
    k: float = 1.0  # components per token (batch top-k: on average over the batch)
    batch_topk: bool = True
    faithfulness_weight: float = 1.0
    reconstruction_weight: float = 1.0
    simplicity_weight: float = 1e-2
    schatten_p: float = 0.9
    probes: int | None = None  # None: exact output-Jacobian rows; P: random-probe estimate
    log_every: int = 100


@dataclass
class APDHistory:
    step: list[int] = field(default_factory=list)
    faithfulness: list[float] = field(default_factory=list)
    reconstruction: list[float] = field(default_factory=list)
    simplicity: list[float] = field(default_factory=list)


class TrainingLog(Progress):
    """Progress of a training loop: a tqdm bar on a terminal, plain lines every ``log_every``
    steps elsewhere (``progress=False``: silent)."""

    def __init__(self, steps: int, log_every: int, progress: bool = True) -> None:
        super().__init__(steps, "step", progress)
        self.log_every = log_every

    def update(self, step: int, terms: dict[str, torch.Tensor]) -> bool:
        """Advances the bar; on a logging step (every log_every, and the last) shows the loss
        terms and returns True."""
        self.advance()
        if step % self.log_every and step != self.total:
            return False
        self.show(f"step {step}/{self.total}",
                  "  ".join(f"{name} {value.item():.3g}" for name, value in terms.items()))
        return True


def apd_attributions(model: nn.Module, layers: dict[str, LinearComponents], x: torch.Tensor, *,
                     probes: int | None = None, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-2: ``(attributions [..., C] over all the layers, the target's outputs)`` for batch x."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(name):
        def hook(module, inputs, output):
            # The first decomposed layer starts the graph; later ones stay in it, so that G of
            # an early layer sees the outputs through the later ones.
            y = output if output.requires_grad else output.detach().requires_grad_()
            captured[name] = (inputs[0].detach(), y)
            return y
        return hook

    with torch.enable_grad(), forward_hooks(model, {name: capture(name) for name in layers}):
        target_out = model(x)
    rows = output_jacobian_rows(target_out, [captured[name][1] for name in layers], probes=probes,
                                generator=generator, retain_graph=False)
    with torch.no_grad():
        # One call over every layer: a component spans them all, so its layers add before the square.
        activations = [layer.component_acts(captured[name][0]) for name, layer in layers.items()]
        attributions = component_attribution(activations, [layer.U for layer in layers.values()], rows)
    return attributions, target_out.detach()


def apd_losses(model: nn.Module, layers: dict[str, LinearComponents], x: torch.Tensor, config: APDConfig,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Steps 1-5 of the module docstring for one batch ``x``: the three loss terms."""
    k = config.k
    attributions, target_out = apd_attributions(model, layers, x, probes=config.probes, generator=generator)
    if config.batch_topk:
        indices, keep = batch_topk_components(attributions, k)
    else:
        indices, keep = topk_components(attributions, round(k)), None
    selected = torch.ones_like(indices, dtype=attributions.dtype) if keep is None else keep.to(attributions.dtype)
    active = torch.zeros_like(attributions).scatter_(-1, indices, selected)

    def through_selected(name):
        return lambda module, inputs, output: layers[name].topk_forward(inputs[0], indices, keep)

    with forward_hooks(model, {name: through_selected(name) for name in layers}):
        topk_out = model(x)
    return {
        "faithfulness": faithfulness_loss(layers.values()),
        "reconstruction": reconstruction_loss(topk_out, target_out),
        "simplicity": schatten_simplicity(layers.values(), active, config.schatten_p),
    }


def train_apd(model: nn.Module, layers: dict[str, LinearComponents], batches: Callable[[], torch.Tensor],
              config: APDConfig, *, generator: torch.Generator | None = None, progress: bool = True) -> APDHistory:
    """Trains the components of ``layers`` (submodule name -> LinearComponents) against the frozen
    ``model``, one ``batches()`` batch per step, with Adam. A tqdm bar on a terminal, plain lines
    every ``log_every`` steps elsewhere (progress=False: silent)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    parameters = [p for layer in layers.values() for p in layer.parameters()]
    weights = {"faithfulness": config.faithfulness_weight, "reconstruction": config.reconstruction_weight,
               "simplicity": config.simplicity_weight}

    def learning_rate(step):
        # Cosine decay to 10%: the top-k selection settles while the learning rate falls.
        return config.learning_rate * (0.55 + 0.45 * math.cos(math.pi * step / config.steps))

    return optimise(parameters, config.steps, learning_rate,
                    lambda: apd_losses(model, layers, batches(), config, generator),
                    weights, APDHistory(), config.log_every, progress)


def optimise(parameters: list[nn.Parameter], steps: int, learning_rate: Callable[[int], float],
             loss_terms: Callable[[], dict[str, torch.Tensor]], weights: dict[str, float], history,
             log_every: int, progress: bool):
    """The loop APD and SPD share: Adam over ``parameters`` for ``steps`` steps at
    ``learning_rate(step)``, minimising sum_name weights[name] * loss_terms()[name]; on each
    logging step the terms are appended to ``history`` (a list per term name, and ``step``)."""
    optimizer = torch.optim.Adam(parameters, lr=learning_rate(1))
    log = TrainingLog(steps, log_every, progress)
    # Checked on logging steps: they sync anyway, and the last step is one.
    nonfinite = NonFiniteWatch(steps, parameters[0].device)
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        terms = loss_terms()
        loss = sum(weight * terms[name] for name, weight in weights.items())
        nonfinite.loss(loss, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if log.update(step, terms):
            if int(nonfinite.first) < nonfinite.never:
                raise FloatingPointError(f"the loss became non-finite (NaN or inf) at step {int(nonfinite.first)}; "
                                         "the components now hold non-finite parameters")
            history.step.append(step)
            for name, value in terms.items():
                getattr(history, name).append(value.item())
    log.close()
    return history
