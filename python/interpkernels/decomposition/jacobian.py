"""G for component_attribution: the rows of the Jacobian of the model's outputs
with respect to each decomposed layer's output, in one batched backward.

APD's calc_grad_attributions runs one backward per output o, each of
out[..., o].sum() (so a token's row sums the output's dependence over all
tokens, as here). Two ways with a constant number of backward calls per step,
independent of O and C:

  exact   one backward batched over the O one-hot output directions
          (torch.autograd.grad(..., is_grads_batched=True), i.e. vmap over
          the backward): G[n, o] = d(sum_n' out[n', o]) / d y[n]. Compute and
          memory still grow with O (O vectorized rows), calls do not.
  probes  an unbiased estimate from P random directions: with z_p ~ N(0, I_O),
          G~[n, p] = z_p^T G[n] / sqrt(P) satisfies E[G~^T G~] = G^T G, so
          component_attribution(h, U, G~) is unbiased for every entry
          A[n, c] = ||G[n] w||^2 (w = h[n,c] U[c]); its relative variance is
          2 sum_i lambda_i^2 / (P (sum_i lambda_i)^2) <= 2 / P, lambda the
          eigenvalues of G[n] w w^T G[n]^T (a chi-square with P dof when
          G[n] w points one way). P, not O, sets the cost: for large O (a
          vocabulary), P = 32 to 128 ranks components well enough for a top-k.
          The directions are shared by every layer of the call, so the
          estimate stays unbiased for the attribution over several layers,
          ||sum_l G_l[n] w_l||^2 (component_attribution with lists).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interpkernels import _validation as v


def output_jacobian_rows(
    outputs: torch.Tensor,
    layer_outputs: Sequence[torch.Tensor],
    *,
    probes: int | None = None,
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
) -> list[torch.Tensor]:
    """G ``[..., O, d_l]`` (or ``[..., P, d_l]`` with ``probes=P``) for each layer output ``[..., d_l]``.

    Args:
        outputs: ``[..., O]`` the model's outputs, computed from ``layer_outputs`` with autograd.
        layer_outputs: the decomposed layers' outputs y (leading dims as ``outputs``).
        probes: None for the exact rows; P for the random-probe estimate (module docstring).
        generator: the probes' random generator.
        retain_graph: keep the graph for a later backward (the training loss's).
    One backward call, batched over the O (or P) directions.
    """
    v.require_float("outputs", outputs)
    if outputs.dim() < 1:
        raise ValueError(f"outputs: expected shape [..., O], got {v.describe(outputs)}")
    for index, y in enumerate(layer_outputs):
        v.require_float(f"layer_outputs[{index}]", y, outputs.device)
        if y.shape[:-1] != outputs.shape[:-1]:
            raise ValueError(f"layer_outputs[{index}]: expected leading dims {list(outputs.shape[:-1])} "
                             f"(those of outputs), got {v.describe(y)}")
    O = outputs.shape[-1]
    if probes is None:
        directions = torch.eye(O, dtype=outputs.dtype, device=outputs.device)
    else:
        probes = v.require_count("probes", probes, 1, 1 << 20, "2^20")
        # One direction z_p per probe, shared by every token, as APD sums an output over tokens.
        directions = torch.randn(probes, O, generator=generator, dtype=outputs.dtype,
                                 device=outputs.device) / probes**0.5
    count = directions.shape[0]
    grad_outputs = directions.view(count, *([1] * (outputs.dim() - 1)), O).expand(count, *outputs.shape)
    grads = torch.autograd.grad(outputs, list(layer_outputs), grad_outputs=grad_outputs, is_grads_batched=True,
                                retain_graph=retain_graph, allow_unused=True)
    rows = []
    for y, grad in zip(layer_outputs, grads):
        if grad is None:  # the outputs do not depend on this layer
            grad = y.new_zeros(grad_outputs.shape[0], *y.shape)
        rows.append(grad.movedim(0, -2))
    return rows
