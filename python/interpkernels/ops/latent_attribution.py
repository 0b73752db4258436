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

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve

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
    # The kernels land in the next commits; until then every backend runs the reference.
    v.require_indices_in_range("clean_indices", clean_indices, W_dec.shape[0])
    v.require_indices_in_range("patched_indices", patched_indices, W_dec.shape[0])
    return reference.latent_attribution(*args, reduce=reduce)


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
