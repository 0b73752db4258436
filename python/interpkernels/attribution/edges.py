"""Edges between the latents of two consecutive sites.

An edge j -> i scores ``dm/df_dst_i * df_dst_i/df_src_j * (f_p - f_c)_src_j``:
the first-order change of the metric when source latent j takes its patched
value only along its path into destination latent i (edge attribution
patching; it equals the gradient of an edge mask at zero, as auto-circuit
formulates it).

- :func:`full_edges`: df_dst/df_src through everything between the sites
  (attention across tokens included), summed over tokens. One batched
  vector-Jacobian product per ``batch_size`` destination latents
  (``is_grads_batched``), never one backward per destination.
- :func:`direct_edges`: the residual path alone, per token: the virtual weight
  ``W_enc_dst[i] . W_dec_src[j]`` (interpkernels.feature_edges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from interpkernels.attribution.sites import SiteCode
from interpkernels.ops import error_attribution, feature_edges, latent_attribution


@dataclass
class Edges:
    latents: torch.Tensor  # full: sparse COO [F, M_src]; direct: sparse COO [..., M_dst, M_src]
    error: torch.Tensor | None  # full: [F], the source error node's edge into each destination; direct: None
    dst_latents: torch.Tensor | None  # full: [F] the destination latent of each row; direct: None


def code_difference(clean: SiteCode, patched: SiteCode) -> tuple[torch.Tensor, torch.Tensor]:
    """``f_p - f_c`` as a code ``(values, indices)`` [..., k_c + k_p] over the union
    of the two supports, each latent once per token (unused slots hold 0)."""
    indices = torch.cat([patched.indices, clean.indices], -1).long()
    values = torch.cat([patched.values.detach(), -clean.values.detach()], -1)
    indices, order = indices.sort(-1)
    values = values.gather(-1, order)
    # A latent in both supports sits in two adjacent slots: fold the second into the first.
    repeated = torch.zeros_like(indices, dtype=torch.bool)
    repeated[..., 1:] = indices[..., 1:] == indices[..., :-1]
    folded = values + torch.where(repeated.roll(-1, -1), values.roll(-1, -1), 0)
    return torch.where(repeated, 0, folded), indices


def encoder_weight(coder: nn.Module) -> torch.Tensor:
    """``[M, d_in]``: interpkernels.nn's ``W_enc``, or an ``encoder`` nn.Linear's weight (sparsify)."""
    weight = getattr(coder, "W_enc", None)
    if weight is None and isinstance(getattr(coder, "encoder", None), nn.Linear):
        weight = coder.encoder.weight
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"edges='direct': coder {type(coder).__name__} has no W_enc [M, d] (or encoder nn.Linear)")
    return weight


def direct_edges(src_clean: SiteCode, src_patched: SiteCode, src_coder: nn.Module, dst_clean: SiteCode,
                 dst_coder: nn.Module, dst_value_grad: torch.Tensor, *, top_k: int | None,
                 threshold: float | None) -> Edges:
    """Per token, ``E[n, i, j] = s[n, i] (W_enc_dst[i] . W_dec_src[j]) (f_p - f_c)[n, j]`` with
    ``s = dm/df_dst`` on the clean destination latents that fire (the encoder's
    derivative is 1 there, 0 elsewhere)."""
    W_dec_src = src_coder.W_dec.detach()
    W_enc_dst = encoder_weight(dst_coder).detach()
    if W_dec_src.shape[1] != W_enc_dst.shape[1]:
        raise ValueError(f"edges='direct': the source decodes width {W_dec_src.shape[1]} but the destination "
                         f"encodes width {W_enc_dst.shape[1]}; the direct path needs one residual space")
    delta_values, delta_indices = code_difference(src_clean, src_patched)
    scale = torch.where(dst_clean.values.detach() > 0, dst_value_grad, 0)
    edges = feature_edges(delta_values, delta_indices, W_dec_src, dst_clean.indices, W_enc_dst, scale,
                          top_k=top_k, threshold=threshold)
    return Edges(edges, None, None)


def full_edges(src_clean: SiteCode, src_patched: SiteCode, W_dec_src: torch.Tensor, dst_clean: SiteCode,
               dst_value_grad: torch.Tensor, dst_scores: torch.Tensor, features: int | None,
               batch_size: int) -> Edges:
    """Edges into the clean-active destination latents with the largest total
    |node score| (``dst_scores`` [M_dst], at most ``features`` of them), from
    every source latent and the source error node, summed over tokens.

    For destination latents b (a batch of them), the vector-Jacobian product
    of ``dm/df_dst * 1[latent == b]`` gives ``h_b = d(sum_n dm/df_dst[n, b] f_dst[n, b]) / dx_src``
    at the source's spliced activation; the source side is then the node
    score formula with h_b for g (``latent_attribution``, ``error_attribution``).
    """
    active = dst_clean.indices[dst_clean.values.detach() > 0].unique()
    order = dst_scores.detach()[active].abs().argsort(descending=True)
    chosen = active[order[:features] if features is not None else order]
    lead = src_clean.error.dim() - 1
    latent_rows, error_rows = [], []
    for start in range(0, len(chosen), batch_size):
        batch = chosen[start:start + batch_size]
        selector = dst_clean.indices.unsqueeze(0) == batch.view(-1, *[1] * dst_clean.indices.dim())
        grad_outputs = torch.where(selector, dst_value_grad.unsqueeze(0), 0)
        (h,) = torch.autograd.grad(dst_clean.encoded, src_clean.spliced, grad_outputs, retain_graph=True,
                                   is_grads_batched=True, allow_unused=True, materialize_grads=True)
        expand = (len(batch), *[-1] * (lead + 1))
        latents = latent_attribution(
            src_clean.values.detach().expand(expand), src_clean.indices.expand(expand),
            src_patched.values.expand(expand), src_patched.indices.expand(expand), h, W_dec_src.detach())
        latent_rows.append(torch.sparse.sum(latents, dim=tuple(range(1, lead + 1))) if lead else latents)
        error = error_attribution(src_clean.error.expand(expand), src_patched.error.expand(expand), h)
        error_rows.append(error.reshape(len(batch), -1).sum(1))
    M_src = W_dec_src.shape[0]
    if not latent_rows:
        empty = torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0), (0, M_src))
        return Edges(empty, torch.zeros(0), chosen)
    return Edges(torch.cat(latent_rows).coalesce(), torch.cat(error_rows), chosen)
