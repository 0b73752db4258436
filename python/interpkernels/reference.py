"""Dense pure-PyTorch versions of every op, written for clarity, not speed.

They are the oracles of the tests (run in float64) and the baselines of the
benchmarks. Each follows docs/OPS.md literally: the encoder materializes the
full pre-activation matrix, the decoder scatters the code into a dense
[N, M] matrix and multiplies.
"""

from __future__ import annotations

import torch


def pre_activations(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, pre_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """pre[..., i] = (x - pre_bias) . W_enc[i] + b_enc[i], shape [..., M]."""
    centered = x if pre_bias is None else x - pre_bias
    return centered @ W_enc.T + b_enc


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    k: int,
    *,
    pre_bias: torch.Tensor | None = None,
    latent_mask: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(relu of the k highest-ranked pre-activations, their latent indices), rows
    in rank order: NaN first (its value stays NaN), then, given `threshold`,
    latents with pre > threshold before the others, then by decreasing pre.

    Without `threshold` this is matmul + torch.topk, as every peer encodes, and
    exact ties are ordered as torch.topk orders them (the kernels break them
    towards the lower index; tests check that rule separately). With it, the
    rank is applied literally by stable sorts, ties to the lower index."""
    pre = pre_activations(x, W_enc, b_enc, pre_bias)
    if threshold is None:
        if latent_mask is not None:
            pre = pre.masked_fill(~latent_mask, float("-inf"))
        top = pre.topk(k, dim=-1)
        return top.values.relu(), top.indices
    order = rank_order(pre, latent_mask=latent_mask, threshold=threshold)[..., :k]
    return pre.gather(-1, order).relu(), order


def rank_order(
    pre: torch.Tensor, *, latent_mask: torch.Tensor | None = None, threshold: torch.Tensor | None = None
) -> torch.Tensor:
    """Every latent of each row of pre [..., M], best first, by the rank all
    backends select with: latents latent_mask keeps in before the others, NaN
    first, then pre > threshold before pre <= threshold, then decreasing pre,
    then increasing latent index. Stable sorts, least significant key first."""
    order = pre.sort(dim=-1, descending=True, stable=True).indices  # NaN first, ties keep index order
    tiers = []
    if threshold is not None:
        tiers.append((pre > threshold) | pre.isnan())
    if latent_mask is not None:
        tiers.append(latent_mask.expand_as(pre))
    for tier in tiers:
        order = order.gather(-1, tier.gather(-1, order).to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices)
    return order


def encode_at(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    indices: torch.Tensor,
    *,
    pre_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """relu(pre) at given latents: topk_encode's values once its selection is
    fixed. Differentiable in every float input, so it is the gradient oracle
    wherever a low-precision selection may legitimately differ from float64's."""
    centered = x if pre_bias is None else x - pre_bias
    return (torch.einsum("...d,...kd->...k", centered, W_enc[indices]) + b_enc[indices]).relu()


def densify(values: torch.Tensor, indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    """The sparse code as a dense [..., M] matrix (repeated indices add up)."""
    dense = values.new_zeros(*values.shape[:-1], num_latents)
    return dense.scatter_add(-1, indices.long(), values)


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, W_dec: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """out[n] = sum_j values[n, j] * W_dec[indices[n, j]] + bias, as a dense matmul."""
    out = densify(values, indices, W_dec.shape[0]) @ W_dec
    return out if bias is None else out + bias


def gathered_dot(dense: torch.Tensor, indices: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """out[n, j] = W[indices[n, j]] . dense[n]."""
    return torch.einsum("nkd,nd->nk", W[indices], dense)


def sparse_transpose_matmul(
    values: torch.Tensor, indices: torch.Tensor, dense: torch.Tensor, num_latents: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^T @ dense, S^T @ 1) for the sparse [N, M] matrix S the code stands for."""
    code = densify(values, indices, num_latents)
    return code.T @ dense, code.sum(0)


def batch_topk_encode(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *, pre_bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dense BatchTopK activations [..., M]: the N*k largest relu(pre) over all
    rows kept, everything else 0 (no per-row cap)."""
    post = pre_activations(x, W_enc, b_enc, pre_bias).relu()
    flat = post.reshape(-1)
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(k * (flat.numel() // W_enc.shape[0])).indices] = True
    return post * keep.view_as(post)


def jumprelu(
    x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor, *,
    pre_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense JumpReLU activations [..., M]: pre * 1[pre > threshold]."""
    pre = pre_activations(x, W_enc, b_enc, pre_bias)
    return pre * (pre > threshold)


def fvu(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: sum ||out - y||^2 / sum ||y - mean(y)||^2
    over all rows (leading dims flattened)."""
    target = target.reshape(-1, target.shape[-1])
    residual = reconstruction.reshape(target.shape) - target
    return residual.square().sum() / (target - target.mean(0)).square().sum()


# ---- Parameter decomposition (APD / SPD), SPEC section 5 ----


def component_attribution(h: torch.Tensor, U: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """APD's attribution of each token's output to each component, [..., C]:

        rank 1  (h [..., C],    U [C, d]):    A[n, c] = sum_o (h[n,c] * (U[c] . G[n,o]))^2
        rank m  (h [..., C, m], B [C, m, d]): A[n, c] = sum_o (sum_r h[n,c,r] * (B[c,r] . G[n,o]))^2

    with G [..., O, d] the output-Jacobian rows at the layer (G[n, o] = d f_o / d y[n]).
    Materializes every projection, [..., O, C, m]."""
    B = U.unsqueeze(1) if U.dim() == 2 else U
    h = h.unsqueeze(-1) if U.dim() == 2 else h
    projections = torch.einsum("...od,crd->...ocr", G, B)
    return (projections * h.unsqueeze(-3)).sum(-1).square().sum(-2)
