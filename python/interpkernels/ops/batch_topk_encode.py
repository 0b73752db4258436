"""batch_topk_encode: BatchTopK (Bussmann et al. 2024) on the fused encoder.

Keeps the N*k largest post-ReLU pre-activations over the whole batch instead
of k per row, so rows get a varying number of latents. Computed as

    1. the fused per-row top-`max_per_row` (topk_encode: no [N, M] matrix),
    2. the N*k largest of those N*max_per_row candidates (one torch.topk),

and returned as a padded code: unselected slots hold value 0 (with a valid
index), so the code feeds sparse_decode and autograd unchanged.

Exactness: the result is exactly the batch top-k whenever no row has more
than `max_per_row` of the batch's N*k largest. If a row hits that cap, it
keeps its `max_per_row` largest and the rest of the budget goes to the next
largest entries of other rows (the batch still gets N*k active entries, or
fewer where candidates are not positive). `rows_at_cap(values)` counts them.
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels.ops.topk_encode import topk_encode


def default_max_per_row(k: int, num_latents: int) -> int:
    """4k: a row rarely takes more than a few times the mean share of a batch."""
    return min(num_latents, 4 * k)


def batch_topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    max_per_row: int | None = None,
    pre_bias: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK code of x: ``(values [..., max_per_row], indices [..., max_per_row])``.

    ``k`` is the mean number of active latents per row; over the N rows of
    x (all leading dimensions) the N*k largest ``relu(pre)`` entries are kept.
    Other arguments as topk_encode (``backend`` picks its implementation). Differentiable in x, W_enc, b_enc, pre_bias.
    """
    v.require_tensor("W_enc", W_enc)
    num_latents = W_enc.shape[0] if W_enc.dim() == 2 else 0
    max_per_row = resolve_max_per_row(k, max_per_row, num_latents)
    values, indices = topk_encode(x, W_enc, b_enc, max_per_row, pre_bias=pre_bias, latent_mask=latent_mask,
                                  backend=backend)
    return keep_batch_top(values, k), indices


def resolve_max_per_row(k: int, max_per_row: int | None, num_latents: int) -> int:
    """The candidates kept per row: `max_per_row` checked (k <= it <= M), or its default."""
    k = v.require_count("k", k, 1, max(num_latents, 1), "M")
    if max_per_row is None:
        max_per_row = default_max_per_row(k, num_latents)
    return v.require_count("max_per_row", max_per_row, k, max(num_latents, k), "M")


def keep_batch_top(values: torch.Tensor, k: int) -> torch.Tensor:
    """Step 2: `values [..., max_per_row]` (per-row candidates) with all but
    the batch's N*k largest set to 0. Latent-sharded SAEs
    (interpkernels.distributed) run it on their gathered candidates."""
    flat = values.reshape(-1)
    budget = min(flat.numel(), k * (flat.numel() // values.shape[-1]))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(budget, sorted=False).indices] = True
    return values * keep.view_as(values)


def rows_at_cap(values: torch.Tensor) -> torch.Tensor:
    """Rows whose every slot is active: there batch_topk_encode may have
    dropped entries of the true batch top-k (a 0-d int64 tensor, no sync)."""
    return (values > 0).all(dim=-1).sum()
