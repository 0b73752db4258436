"""jumprelu_encode: the JumpReLU SAE encoder (Rajamanoharan et al. 2024) on
the fused top-k encoder.

    f[n, i] = pre[n, i] * 1[pre[n, i] > threshold[i]]

kept sparse: topk_encode with the thresholds ranks the latents above their
own threshold first, by pre-activation, and keeps the `max_l0` best of each
row (no [N, M] matrix); values at or below threshold are then zeroed. The
result is exact whenever a row has at most `max_l0` latents above threshold;
a row with more keeps its `max_l0` largest. Such rows have every slot active:
`rows_at_cap(values)` counts the rows that hit the cap. Slots a row cannot
fill hold value 0 at the row's best latents at or below threshold.

Gradients: x, W_enc, b_enc and pre_bias get the exact gradient of f
(1[pre > threshold] times that of pre). The threshold, a step function's
parameter, gets the straight-through pseudo-gradient with a rectangle kernel
of bandwidth eps:

    d f / d threshold_i = -(threshold_i / eps) * rect((pre - threshold_i) / eps),
    rect(u) = 1[|u| < 1/2],

summed over the entries of latent i. Only entries among a row's `max_l0`
slots contribute (a pre just below threshold outside them does not).
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels.ops.batch_topk_encode import rows_at_cap
from interpkernels.ops.topk_encode import topk_encode

__all__ = ["apply_slot_threshold", "apply_threshold", "jumprelu_candidates", "jumprelu_encode", "jumprelu_l0",
           "rows_at_cap", "slot_threshold_l0"]


class _ThresholdFunction(torch.autograd.Function):
    """A step at the code's entries: inputs (pre, theta gathered per entry, eps)."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        pre, theta, bandwidth = inputs
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth

    @staticmethod
    def rectangle(ctx, pre, theta):
        """rect((pre - theta) / eps) / eps: the straight-through kernel."""
        u = (pre - theta) / ctx.bandwidth
        return (u.abs() < 0.5).to(u.dtype) / ctx.bandwidth


class _JumpReLU(_ThresholdFunction):
    """f = pre * 1[pre > theta]; d f / d theta = -theta * rect((pre - theta)/eps) / eps."""

    @staticmethod
    def forward(pre, theta, bandwidth):
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad_f):
        pre, theta = ctx.saved_tensors
        return grad_f * (pre > theta), -grad_f * theta * _ThresholdFunction.rectangle(ctx, pre, theta), None


class _StepL0(_ThresholdFunction):
    """1[pre > theta]; d / d theta = -rect((pre - theta)/eps) / eps, nothing for pre."""

    @staticmethod
    def forward(pre, theta, bandwidth):
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad_step):
        pre, theta = ctx.saved_tensors
        return None, -grad_step * _ThresholdFunction.rectangle(ctx, pre, theta), None


def jumprelu_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    max_l0: int,
    *,
    bandwidth: float = 0.001,
    pre_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """JumpReLU code of x: ``(values [..., max_l0], indices [..., max_l0])``,
    values 0 where the pre-activation is at or below its latent's threshold.

    threshold: ``[M]``, positive. bandwidth: the straight-through kernel width eps.
    backend: the implementation of the underlying topk_encode.
    """
    candidates, indices = jumprelu_candidates(x, W_enc, b_enc, threshold, max_l0, pre_bias=pre_bias,
                                              backend=backend)
    return apply_threshold(candidates, indices, threshold, bandwidth), indices


def jumprelu_candidates(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    threshold: torch.Tensor,
    max_l0: int,
    *,
    pre_bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k code JumpReLU values are taken from: ``relu(pre)`` at each
    row's `max_l0` best latents, those above their threshold first."""
    return topk_encode(x, W_enc, b_enc, max_l0, pre_bias=pre_bias, threshold=threshold, backend=backend)


def _check_threshold(threshold: torch.Tensor, bandwidth: float, candidates: torch.Tensor) -> torch.Tensor:
    v.require_float("threshold", threshold)
    if threshold.dim() != 1:
        raise ValueError(f"threshold: expected shape [M], got {v.describe(threshold)}")
    if not (isinstance(bandwidth, float) and bandwidth > 0):
        raise ValueError(f"bandwidth: expected a positive float, got {bandwidth!r}")
    return threshold.to(candidates.dtype)


def apply_threshold(candidates: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor,
                    bandwidth: float = 0.001) -> torch.Tensor:
    """JumpReLU values from a top-k code's candidates (``relu(pre)`` at
    ``indices``): 0 at or below each latent's threshold."""
    threshold = _check_threshold(threshold, bandwidth, candidates)
    return apply_slot_threshold(candidates, threshold[indices], bandwidth)


def apply_slot_threshold(candidates: torch.Tensor, slot_threshold: torch.Tensor,
                         bandwidth: float = 0.001) -> torch.Tensor:
    """apply_threshold with the thresholds already taken at the code's entries
    (``slot_threshold`` shaped like ``candidates``): the form a latent-sharded
    SAE uses, whose thresholds of other ranks' latents arrive per entry."""
    return _JumpReLU.apply(candidates, slot_threshold.to(candidates.dtype), bandwidth)


def jumprelu_l0(candidates: torch.Tensor, indices: torch.Tensor, threshold: torch.Tensor,
                bandwidth: float = 0.001) -> torch.Tensor:
    """Mean over rows of the active count sum_i 1[pre > threshold_i], with the
    straight-through threshold gradient: a JumpReLU SAE's sparsity penalty.
    ``candidates, indices``: the topk_encode code the JumpReLU code came from."""
    threshold = _check_threshold(threshold, bandwidth, candidates)
    return slot_threshold_l0(candidates, threshold[indices], bandwidth)


def slot_threshold_l0(candidates: torch.Tensor, slot_threshold: torch.Tensor,
                      bandwidth: float = 0.001) -> torch.Tensor:
    """jumprelu_l0 with the thresholds taken at the code's entries (as apply_slot_threshold)."""
    step = _StepL0.apply(candidates, slot_threshold.to(candidates.dtype), bandwidth)
    return step.sum(-1).mean()
