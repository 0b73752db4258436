"""APD's top-k component forward (SPEC section 5): keep, per token, the components
of highest attribution and run the layer through those only,

    y[n] = sum_{c in topk(n)} sum_r h[n,c,r] B[c,r] + b,     h = x @ V  (rank m: x @ A[c]),

which is interpkernels.sparse_decode with values = h gathered at the kept
components. Autograd through the gather gives grad_h scattered to the kept
entries, hence grad_V = x^T @ scatter(grad_h) and grad_x = scatter(grad_h) @ V^T.

Two selections, both as padded sparse codes that sparse_decode takes unchanged:
  topk_components         k components per token (torch.topk on [N, C]).
  batch_topk_components   the N*k largest attributions over the whole batch,
                          a per-row top-`max_per_row` first, then one topk over
                          those candidates; unselected slots keep a valid index
                          and a False in `keep`, so their value is zeroed.
"""

from __future__ import annotations

import math

import torch

from interpkernels import _validation as v
from interpkernels.ops.sparse_decode import sparse_decode


def topk_components(attributions: torch.Tensor, k: int) -> torch.Tensor:
    """Indices ``[..., k]`` (int64) of each token's k components of largest attribution ``[..., C]``."""
    v.require_float("attributions", attributions)
    k = v.require_count("k", k, 1, max(attributions.shape[-1], 1), "C")
    return attributions.topk(k, dim=-1, sorted=False).indices


def batch_topk_components(
    attributions: torch.Tensor, k: float, *, max_per_row: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch top-k: ``(indices [..., max_per_row], keep [..., max_per_row] bool)``.

    ``k`` (a float: the mean number of components per token) sets the budget:
    over the N tokens (all leading dims) the round(N k) largest attributions are
    kept, so tokens get a varying number of components. Exact whenever no token
    has more than ``max_per_row`` (default min(C, ceil(4k))) of them; a token at
    that cap keeps its ``max_per_row`` largest and the rest of the budget goes to others.
    """
    v.require_float("attributions", attributions)
    C = attributions.shape[-1]
    if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= C:
        raise ValueError(f"k: expected a number in (0, C = {C}], got {k!r}")
    default_cap = min(C, math.ceil(4 * k))
    max_per_row = v.require_count("max_per_row", default_cap if max_per_row is None else max_per_row,
                                  min(C, math.ceil(k)), C, "C")
    candidates = attributions.topk(max_per_row, dim=-1, sorted=False)
    flat = candidates.values.reshape(-1)
    tokens = flat.numel() // max_per_row
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(min(flat.numel(), round(k * tokens)), sorted=False).indices] = True
    return candidates.indices, keep.view_as(candidates.values)


def component_forward(
    h: torch.Tensor,
    U: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    keep: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """The layer's output through the kept components only, ``[..., d_out]``.

    Args:
        h: component activations ``[..., C]`` (rank 1) or ``[..., C, m]`` (rank m), e.g. ``x @ V``.
        U: ``[C, d_out]`` or ``[C, m, d_out]`` (B).
        indices: ``[..., k]`` kept components per token (topk_components / batch_topk_components).
        bias: optional ``[d_out]``.
        keep: optional ``[..., k]`` bool: slots that count (batch top-k); others add nothing.
        backend: sparse_decode's backend.

    Differentiable in h (so in x and V through ``h = x @ V``), U and bias.
    """
    v.require_float("h", h)
    v.require_float("U", U, h.device)
    if U.dim() not in (2, 3):
        raise ValueError(f"U: expected shape [C, d_out] or [C, m, d_out], got {v.describe(U)}")
    m = 1 if U.dim() == 2 else U.shape[1]
    component_dims = 1 if U.dim() == 2 else 2
    if h.dim() < component_dims + 1 or tuple(h.shape[h.dim() - component_dims:]) != tuple(U.shape[:-1]):
        raise ValueError(f"h: expected shape [..., {', '.join(map(str, U.shape[:-1]))}] (from U), got {v.describe(h)}")
    leading = h.shape[: h.dim() - component_dims]
    indices = v.require_tensor("indices", indices)
    if indices.shape[:-1] != leading or indices.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"indices: expected an int64 tensor of shape [{', '.join(map(str, leading))}, k], "
                         f"got {v.describe(indices)}")
    if keep is not None and (keep.shape != indices.shape or keep.dtype != torch.bool):
        raise ValueError(f"keep: expected a bool tensor of shape {list(indices.shape)}, got {v.describe(keep)}")
    v.require_indices_in_range("indices", indices, U.shape[0])
    N, C, d_out = math.prod(leading), U.shape[0], U.shape[-1]
    # Rank m: component c's piece r is row c*m + r of the flattened B.
    slots = (indices.reshape(N, -1, 1).long() * m + torch.arange(m, device=h.device)).reshape(N, -1)
    values = h.reshape(N, C * m).gather(1, slots)
    if keep is not None:
        values = values * keep.reshape(N, -1, 1).expand(-1, -1, m).reshape(N, -1)
    out = sparse_decode(values, slots, U.reshape(C * m, d_out), bias, backend=backend)
    return out.view(*leading, d_out)
