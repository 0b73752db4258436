"""latent_attribution: attribution patching (AtP) scores of SAE latents.

    attr[n, i] = (f_p - f_c)[n, i] * (W_dec[i] . grad[n])    for i in U_n,

U_n the union of row n's clean and patched supports (a latent in both counts
once; in one only, the other code is 0 there). Only the |U_n| <= k_c + k_p
gathered dots W_dec[i] . grad[n] are computed, never the [N, M] product the
dense formulation (feature-circuits: f dense with requires_grad, metric
backward) builds.

Integrated gradients: the latent path is linear through the decoder, so the
IG score over S interpolation steps is Delta f_i * (W_dec[i] . g_bar) with
g_bar the mean of the S site gradients -- pass g_bar as `grad`.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels

REDUCTIONS = ("none", "sum", "mean_abs")


def latent_attribution(
    clean_values: torch.Tensor,
    clean_indices: torch.Tensor,
    patched_values: torch.Tensor,
    patched_indices: torch.Tensor,
    grad: torch.Tensor,
    W_dec: torch.Tensor,
    *,
    reduce: str = "none",
    backend: str | None = None,
) -> torch.Tensor:
    """AtP scores of SAE latents over the union of the clean and patched supports.

    Args:
        clean_values, clean_indices: the clean run's sparse code, ``[..., k_c]``
            (indices int64 or int32 in ``[0, M)``, distinct within a row).
        patched_values, patched_indices: the patched run's code, ``[..., k_p]``.
        grad: ``[..., d]`` gradient of the metric at the SAE site on the clean
            run (for integrated gradients: the mean of the steps' gradients).
        W_dec: ``[M, d]`` decoder.
        reduce: ``"none"``: a coalesced ``torch.sparse_coo_tensor`` of shape
            ``[..., M]`` with one entry per (token, latent of the union),
            stored even where the score is 0; ``"sum"``: dense ``[M]``, the
            sum over tokens; ``"mean_abs"``: dense ``[M]``, the mean over
            tokens of ``|attr|`` (latents outside a token's union count 0).
        backend: which implementation runs (interpkernels._backends).

    Returns float32 scores (float64 for float64 inputs).
    """
    args = _validate(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec, reduce)
    clean_values, clean_indices, patched_values, patched_indices, grad, W_dec = args
    backend = resolve("latent_attribution", backend, grad.device)
    if backend == "torch":
        v.require_indices_in_range("clean_indices", clean_indices, W_dec.shape[0])
        v.require_indices_in_range("patched_indices", patched_indices, W_dec.shape[0])
        return reference.latent_attribution(*args, reduce=reduce)

    # Row counts spelled out: reshape(0, -1) cannot infer a width.
    N = math.prod(grad.shape[:-1])
    deltas, dots, union_indices = kernels(backend).latent_attribution(
        *(t.reshape(N, t.shape[-1]) for t in (clean_values, clean_indices, patched_values, patched_indices, grad)),
        W_dec)
    return _reduce(deltas * dots, union_indices, W_dec.shape[0], reduce, grad.shape[:-1])


def _reduce(scores: torch.Tensor, union_indices: torch.Tensor, num_latents: int, reduce: str,
            leading: torch.Size) -> torch.Tensor:
    """Per-slot scores [N, K] (0 at slots -1) in the requested output form."""
    if reduce == "none":
        # A row holds each latent once: sorted within rows (slots -1 first), the
        # entries are coalesced as they stand, with no global sort.
        union_indices, order = union_indices.sort(dim=-1)
        scores = scores.gather(1, order)
        kept = union_indices >= 0
        tokens = kept.nonzero(as_tuple=True)[0]
        coordinates = torch.stack([*reference.token_coordinates(tokens, leading), union_indices[kept]])
        return torch.sparse_coo_tensor(coordinates, scores[kept], (*leading, num_latents), is_coalesced=True,
                                       check_invariants=False)
    contributions = (scores if reduce == "sum" else scores.abs()).reshape(-1)
    # Slots -1 add an exact 0 to latent 0. index_put_ with accumulate=True sums
    # serially on CPU and by a stable sort on CUDA: deterministic on both.
    total = scores.new_zeros(num_latents).index_put_((union_indices.clamp_min(0).reshape(-1),), contributions,
                                                      accumulate=True)
    return total if reduce == "sum" else total / scores.shape[0]


def _validate(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec, reduce):
    if not isinstance(reduce, str) or reduce not in REDUCTIONS:
        raise ValueError(f"reduce: expected one of {', '.join(map(repr, REDUCTIONS))}, got {reduce!r}")
    grad = v.require_float("grad", grad)
    if grad.dim() < 1:
        raise ValueError(f"grad: expected a tensor of shape [..., d], got {v.describe(grad)}")
    leading = tuple(grad.shape[:-1])
    W_dec = v.require_float("W_dec", W_dec, grad.device)
    if W_dec.dim() != 2 or W_dec.shape[1] != grad.shape[-1]:
        raise ValueError(f"W_dec: expected shape [M, d] with d = {grad.shape[-1]} (the width of grad), "
                         f"got {v.describe(W_dec)}")
    codes = []
    for run, values, indices in (("clean", clean_values, clean_indices), ("patched", patched_values, patched_indices)):
        values = v.require_float(f"{run}_values", values, grad.device)
        if values.dim() < 1 or tuple(values.shape[:-1]) != leading:
            raise ValueError(f"{run}_values: expected shape [..., k] with leading dims {list(leading)} "
                             f"(those of grad), got {v.describe(values)}")
        codes += [values, v.require_indices(f"{run}_indices", indices, values)]
    clean_values, clean_indices, patched_values, patched_indices = codes
    v.require_same_device("grad", grad, W_dec=W_dec, clean_values=clean_values, patched_values=patched_values)
    clean_values, patched_values, grad, W_dec = v.autocast_inputs(grad.device, clean_values, patched_values, grad,
                                                                  W_dec)
    v.require_same_dtype("grad", grad, W_dec=W_dec, clean_values=clean_values, patched_values=patched_values)
    if reduce == "mean_abs":
        v.require_rows("grad", grad)
    return clean_values, clean_indices, patched_values, patched_indices, grad, W_dec


def _score_dtype(tensor: torch.Tensor) -> torch.dtype:
    return reference.attribution_dtype(tensor.dtype)


def _latent_attribution_fake(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec):
    shape = (grad.shape[0], clean_indices.shape[1] + patched_indices.shape[1])
    deltas = grad.new_empty(shape, dtype=_score_dtype(grad))
    return deltas, torch.empty_like(deltas), clean_indices.new_empty(shape)


def _latent_attribution_setup(ctx, inputs, output):
    clean_values, clean_indices, patched_values, patched_indices, grad, W_dec = inputs
    ctx.save_for_backward(clean_indices, patched_indices, grad, W_dec, output[2])
    ctx.value_dtypes = (clean_values.dtype, patched_values.dtype)


def _first_slot(indices: torch.Tensor, union_indices: torch.Tensor) -> torch.Tensor:
    """For each entry of a code [N, k], the union slot that holds its latent
    (the first slot with that latent: exactly one slot of union_indices has it)."""
    return (indices.unsqueeze(-1) == union_indices.unsqueeze(-2)).to(torch.uint8).argmax(-1)


def _register(ops: Kernels) -> None:
    """Fake implementation and autograd of one backend's latent_attribution.

    deltas[s] = f_p - f_c at slot s's latent is linear in the values (each
    entry reaches the one slot holding its latent, with sign +1 patched, -1
    clean); dots[s] = W_dec[latent] . grad[n] is gathered_dot, whose gradients
    are sparse_decode (grad) and sparse_transpose_matmul (W_dec) of the slots'
    output gradients, run on this backend's kernels.
    """

    def backward(ctx, grad_deltas, grad_dots, _grad_union):
        clean_indices, patched_indices, grad, W_dec, union_indices = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_clean = grad_patched = grad_grad = grad_W_dec = None
        if grad_deltas is not None and needs[0]:
            grad_clean = -grad_deltas.gather(1, _first_slot(clean_indices, union_indices)).to(ctx.value_dtypes[0])
        if grad_deltas is not None and needs[2]:
            grad_patched = grad_deltas.gather(1, _first_slot(patched_indices, union_indices)).to(ctx.value_dtypes[1])
        if grad_dots is not None and (needs[4] or needs[5]):
            # Slots -1 hold a constant 0: their gradient goes nowhere (and latent 0 gets + 0).
            slot_grads = torch.where(union_indices >= 0, grad_dots, 0).to(grad.dtype)
            latents = union_indices.clamp_min(0)
            if needs[4]:
                grad_grad = ops.sparse_decode(slot_grads, latents, W_dec, None)
            if needs[5]:
                grad_W_dec = ops.sparse_transpose_matmul(slot_grads, latents, grad, W_dec.shape[0])[0]
        return grad_clean, None, grad_patched, None, grad_grad, grad_W_dec

    torch.library.register_fake(ops.latent_attribution, _latent_attribution_fake)
    torch.library.register_autograd(ops.latent_attribution, backward, setup_context=_latent_attribution_setup)


_register(NATIVE)
_register(TRITON)
