"""Attribution patching on the latents of sparse coders sitting in a model.

    from interpkernels.attribution import attribute
    result = attribute(model, {"blocks.0": sae0, "blocks.1": sae1}, clean, patched, metric)
    result.nodes["blocks.1"].latents      # sparse COO [..., M]: (f_p - f_c)_i * (W_dec[i] . g)
    result.nodes["blocks.1"].error        # [...]: (eps_p - eps_c) . g
    result.edges[("blocks.0", "blocks.1")]

Scores are first-order estimates of ``metric(patched) - metric(clean)`` when a
node takes its patched value (Nanda 2023; Kramar et al. 2024; Marks et al.
2024). With g = dm/dx the gradient at a site's spliced activation
``x = x_hat(f) + eps`` (see :mod:`.sites`):

- AtP: g at the clean run, all sites spliced, one backward for every site.
- IG: per site, g averaged over the S runs in which that site's activation is
  ``x_c + alpha (x_p - x_c)``, alpha = 0, 1/S, ..., (S-1)/S (the other sites
  spliced). The decoder is linear, so the latent score
  ``sum_s df_i (W_dec[i] . g_s) / S`` equals ``df_i (W_dec[i] . mean_s g_s)``:
  average in d, project once.

By default (``gradient="straight_through"``, as feature-circuits) g reaches a
site from the real model downstream, straight through the coders of later
sites: a site's scores estimate the real model's response to patching it and
do not depend on which other sites are hooked (IG's latent and error scores
then add up to the real patching effect, up to the Riemann sum's error).
``gradient="through_coders"`` lets g flow back through the later sites'
encoders instead (their errors frozen): attribution in the model whose later
sites are replaced by their coders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from interpkernels.attribution import sites as s
from interpkernels.attribution.edges import Edges, direct_edges, full_edges
from interpkernels.ops import error_attribution, latent_attribution

REDUCTIONS = ("none", "sum", "mean_abs")
METHODS = ("atp", "ig")
EDGE_MODES = (None, "full", "direct")


@dataclass
class NodeScores:
    latents: torch.Tensor  # sparse COO [..., M] (reduce="none") or dense [M]
    error: torch.Tensor  # [...] (reduce="none") or 0-d


@dataclass
class AttributionResult:
    metric_clean: float
    metric_patched: float
    nodes: dict[str, NodeScores] = field(default_factory=dict)
    edges: dict[tuple[str, str], Edges] = field(default_factory=dict)

    def top_latents(self, site: str, n: int = 10) -> list[tuple[int, float]]:
        """The n latents of a site with the largest |score| over tokens (summed, or
        as reduced): ``[(latent, score), ...]``, best first."""
        totals = latent_totals(self.nodes[site].latents)
        order = totals.abs().argsort(descending=True)[:n]
        return [(int(i), float(totals[i])) for i in order]


def latent_totals(latents: torch.Tensor) -> torch.Tensor:
    """Dense [M] from node scores: summed over tokens when sparse per token, as is when reduced."""
    if not latents.is_sparse:
        return latents
    if latents.dim() == 1:
        return latents.to_dense()
    return torch.sparse.sum(latents, dim=tuple(range(latents.dim() - 1))).to_dense()


def scalar_metric(metric: Callable[[object], torch.Tensor], output: object) -> torch.Tensor:
    value = metric(output)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise TypeError(f"metric: expected a float tensor from metric(output), got {type(value).__name__}")
    return value.sum()  # per-example metrics: the sum's gradient is each example's


def reduce_error(error: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "sum":
        return error.sum()
    if reduce == "mean_abs":
        return error.abs().mean()
    return error


def node_scores(clean: s.SiteCode, patched: s.SiteCode, grad: torch.Tensor, W_dec: torch.Tensor,
                reduce: str) -> NodeScores:
    latents = latent_attribution(clean.values.detach(), clean.indices, patched.values, patched.indices,
                                 grad, W_dec.detach(), reduce=reduce)
    error = error_attribution(clean.error, patched.error, grad)
    return NodeScores(latents, reduce_error(error, reduce))


def check_options(method: str, steps: int, reduce: str, edges: str | None, gradient: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {REDUCTIONS}, got {reduce!r}")
    if edges not in EDGE_MODES:
        raise ValueError(f"edges: expected one of {EDGE_MODES}, got {edges!r}")
    if gradient not in s.GRADIENTS:
        raise ValueError(f"gradient: expected one of {s.GRADIENTS}, got {gradient!r}")


def check_patched(clean: Mapping[str, s.SiteCode], patched: Mapping[str, s.SiteCode]) -> None:
    for name, code in clean.items():
        if patched[name].error.shape != code.error.shape:
            raise ValueError(f"patched: the activation at site {name!r} has shape {list(patched[name].error.shape)}, "
                             f"the clean run's {list(code.error.shape)}; clean and patched inputs must have the same "
                             "shape")


def integrated_gradient(model: nn.Module, modules, coders, clean_inputs: object, name: str,
                        clean_act: torch.Tensor, patched_act: torch.Tensor,
                        metric: Callable[[object], torch.Tensor], steps: int, gradient: str) -> torch.Tensor:
    """Mean over alpha = 0, 1/S, ..., (S-1)/S of dm/dx at site `name` with x = x_c + alpha (x_p - x_c)."""
    total = torch.zeros_like(clean_act)
    delta = patched_act - clean_act
    for step in range(steps):
        interpolated = (clean_act + (step / steps) * delta).requires_grad_()
        output, _ = s.spliced_run(model, modules, coders, clean_inputs, fixed={name: interpolated}, gradient=gradient)
        (grad,) = torch.autograd.grad(scalar_metric(metric, output), interpolated)
        total += grad
    return total / steps


def attribute(
    model: nn.Module,
    sites: Mapping[str, nn.Module],
    clean: object,
    patched: object,
    metric: Callable[[object], torch.Tensor],
    *,
    method: str = "atp",
    steps: int = 8,
    reduce: str = "none",
    edges: str | None = None,
    edge_features: int | None = 64,
    edge_batch_size: int = 32,
    top_k: int | None = None,
    threshold: float | None = None,
    gradient: str = "straight_through",
) -> AttributionResult:
    """Node (and optionally edge) attribution scores of every site's latents and error.

    model: any nn.Module, called as ``model(**x)`` for a dict input,
    ``model(*x)`` for a tuple, ``model(x)`` otherwise. sites: ``{submodule
    name: sparse coder}`` (see :mod:`.sites`). clean, patched: inputs of the
    same shape. metric: ``metric(model output) -> tensor``, summed to a scalar.

    method: "atp" (one forward + one backward for all sites after a no-grad
    patched pass) or "ig" (``steps`` forward + backward passes per site).
    reduce: "none" (sparse COO [..., M] per token), "sum" or "mean_abs" over
    tokens (dense [M]); the error scores are reduced alike.

    gradient: how gradients cross the sites downstream of a site (module
    docstring): "straight_through" (the real model's gradients) or
    "through_coders" (through the later sites' encoders, errors frozen).

    edges: between consecutive sites (in the order the forward pass runs them),
    from the AtP gradients:

    - "full": through everything between the two sites, summed over tokens;
      ``Edges.latents`` sparse [F, M_src] for the F destination latents with
      the largest total |node score| (``edge_features``; None for all active
      ones), computed ``edge_batch_size`` destinations per vector-Jacobian
      product (``torch.autograd.grad(..., is_grads_batched=True)``).
    - "direct": the residual path only (virtual weights, per token), through
      :func:`interpkernels.feature_edges`, pruned per token by ``top_k`` /
      ``threshold``.
    """
    check_options(method, steps, reduce, edges, gradient)
    modules = s.resolve_sites(model, sites)
    patched_output, patched_codes = s.record_codes(model, modules, sites, patched)
    output, clean_codes = s.spliced_run(model, modules, sites, clean, gradient=gradient)
    check_patched(clean_codes, patched_codes)
    metric_value = scalar_metric(metric, output)
    names = list(clean_codes)  # in the order the forward pass ran them
    spliced = [clean_codes[name].spliced for name in names]
    values = [clean_codes[name].values for name in names]
    grads = torch.autograd.grad(metric_value, spliced + values, retain_graph=edges == "full", allow_unused=True)
    site_grads = {name: g if g is not None else torch.zeros_like(x) for name, g, x in
                  zip(names, grads[:len(names)], spliced)}
    value_grads = {name: g if g is not None else torch.zeros_like(v) for name, g, v in
                   zip(names, grads[len(names):], values)}
    with torch.no_grad():
        metric_patched = scalar_metric(metric, patched_output)

    result = AttributionResult(float(metric_value.detach()), float(metric_patched))
    for name in names:
        grad = site_grads[name]
        if method == "ig":
            grad = integrated_gradient(model, modules, sites, clean, name, clean_codes[name].spliced.detach(),
                                       patched_codes[name].spliced, metric, steps, gradient)
        result.nodes[name] = node_scores(clean_codes[name], patched_codes[name], grad,
                                         s.decoder_weight(sites[name]), reduce)

    for src, dst in zip(names, names[1:]):
        if edges == "full":
            result.edges[(src, dst)] = full_edges(
                clean_codes[src], patched_codes[src], s.decoder_weight(sites[src]), clean_codes[dst],
                value_grads[dst], latent_totals(result.nodes[dst].latents), edge_features, edge_batch_size)
        elif edges == "direct":
            result.edges[(src, dst)] = direct_edges(
                clean_codes[src], patched_codes[src], sites[src], clean_codes[dst], sites[dst], value_grads[dst],
                top_k=top_k, threshold=threshold)
    return result
