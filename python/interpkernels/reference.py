"""Dense pure-PyTorch versions of every op, written for clarity, not speed.

They are the oracles of the tests (run in float64) and the baselines of the
benchmarks. Each follows docs/OPS.md literally: the encoder materializes the
full pre-activation matrix, the decoder scatters the code into a dense
[N, M] matrix and multiplies.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def component_attribution(h: torch.Tensor | Sequence[torch.Tensor], U: torch.Tensor | Sequence[torch.Tensor],
                          G: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """APD's attribution of each token's output to each component, [..., C]:

        rank 1  (h [..., C],    U [C, d]):    A[n, c] = sum_o (h[n,c] * (U[c] . G[n,o]))^2
        rank m  (h [..., C, m], B [C, m, d]): A[n, c] = sum_o (sum_r h[n,c,r] * (B[c,r] . G[n,o]))^2

    with G [..., O, d] the output-Jacobian rows at the layer (G[n, o] = d f_o / d y[n]).
    Sequences of h, U, G (one entry per decomposed layer l) sum the layers' terms inside the
    square, A[n, c] = sum_o (sum_l sum_r h_l[n,c,r] (B_l[c,r] . G_l[n,o]))^2: a component
    spans every layer. Materializes every projection, [..., O, C, m]."""
    if isinstance(h, torch.Tensor):
        h, U, G = [h], [U], [G]
    inner = 0
    for h_layer, U_layer, G_layer in zip(h, U, G, strict=True):
        B = U_layer.unsqueeze(1) if U_layer.dim() == 2 else U_layer
        h_layer = h_layer.unsqueeze(-1) if U_layer.dim() == 2 else h_layer
        projections = torch.einsum("...od,crd->...ocr", G_layer, B)
        inner = inner + (projections * h_layer.unsqueeze(-3)).sum(-1)
    return inner.square().sum(-2)


def masked_component_forward(x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, U: torch.Tensor,
                             W_delta: torch.Tensor | None = None, delta_mask: torch.Tensor | None = None,
                             bias: torch.Tensor | None = None) -> torch.Tensor:
    """SPD's masked forward through a decomposed linear layer, [..., d_out]:

        rank 1  (h [..., C],    U [C, d_out]):    y[n] = sum_c mask[n,c] h[n,c] U[c]
        rank m  (h [..., C, m], B [C, m, d_out]): y[n] = sum_c mask[n,c] sum_r h[n,c,r] B[c,r]

    plus delta_mask[n] (W_delta x[n]) (delta_mask absent: 1) and bias, as autograd of
    the literal formula (it saves h * mask and x W_delta^T)."""
    B = U.unsqueeze(1) if U.dim() == 2 else U
    h = h.unsqueeze(-1) if U.dim() == 2 else h
    out = torch.einsum("...cr,crd->...d", h * mask.unsqueeze(-1), B)
    if W_delta is not None:
        delta = x @ W_delta.T
        out = out + (delta if delta_mask is None else delta_mask.unsqueeze(-1) * delta)
    return out if bias is None else out + bias


# ---- Attribution patching (SPEC §4; ops/latent_attribution.py, error_attribution.py, feature_edges.py) ----


def attribution_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attribution scores are float32 (float64 for float64 inputs, for gradchecks)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def token_coordinates(tokens: torch.Tensor, leading: torch.Size) -> list[torch.Tensor]:
    """Flat token numbers as coordinates in the leading dims (none for a single unbatched token)."""
    return list(torch.unravel_index(tokens, leading)) if len(leading) else []


def _sparse_rows(scores: torch.Tensor, keep: torch.Tensor, leading: torch.Size, trailing: tuple[int, ...]):
    """The entries of a dense [N, *trailing] `scores` where `keep` holds, as a
    coalesced sparse COO tensor of shape [*leading, *trailing]."""
    tokens, *rest = keep.nonzero(as_tuple=True)
    coordinates = torch.stack([*token_coordinates(tokens, leading), *rest])
    return torch.sparse_coo_tensor(coordinates, scores[keep], (*leading, *trailing), check_invariants=False).coalesce()


def latent_attribution(
    clean_values: torch.Tensor,
    clean_indices: torch.Tensor,
    patched_values: torch.Tensor,
    patched_indices: torch.Tensor,
    grad: torch.Tensor,
    W_dec: torch.Tensor,
    *,
    reduce: str = "none",
) -> torch.Tensor:
    """AtP scores of SAE latents: attr[n, i] = (f_p - f_c)[n, i] * (W_dec[i] . grad[n])
    for i in the union of row n's clean and patched supports, the codes made
    dense ([N, M]) as feature-circuits does. reduce="none": a coalesced sparse
    COO [..., M] holding every union entry; "sum" / "mean_abs": dense [M], the
    sum / mean of |attr| over tokens."""
    dtype = attribution_dtype(grad.dtype)
    M, d = W_dec.shape
    leading = grad.shape[:-1]
    clean_indices, patched_indices = clean_indices.reshape(-1, clean_indices.shape[-1]), patched_indices.reshape(
        -1, patched_indices.shape[-1])
    f_clean = densify(clean_values.reshape(clean_indices.shape).to(dtype), clean_indices, M)
    f_patched = densify(patched_values.reshape(patched_indices.shape).to(dtype), patched_indices, M)
    support = torch.zeros_like(f_clean, dtype=torch.bool)
    support.scatter_(1, clean_indices.long(), True).scatter_(1, patched_indices.long(), True)
    site = grad.reshape(-1, d).to(dtype) @ W_dec.to(dtype).T  # [N, M]: W_dec[i] . grad[n]
    attr = torch.where(support, (f_patched - f_clean) * site, 0)
    if reduce == "sum":
        return attr.sum(0)
    if reduce == "mean_abs":
        return attr.abs().mean(0)
    return _sparse_rows(attr, support, leading, (M,))


def error_attribution(clean_error: torch.Tensor, patched_error: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """AtP score of the SAE error node: attr[n] = (eps_p - eps_c)[n] . grad[n], shape [...]."""
    dtype = attribution_dtype(grad.dtype)
    return ((patched_error.to(dtype) - clean_error.to(dtype)) * grad.to(dtype)).sum(-1)


def feature_edge_scores(
    src_values: torch.Tensor,
    src_indices: torch.Tensor,
    W_dec_src: torch.Tensor,
    dst_indices: torch.Tensor,
    W_enc_dst: torch.Tensor,
    dst_scale: torch.Tensor,
) -> torch.Tensor:
    """Every edge of every token, unpruned: E[n, i, j] = dst_scale[n, i] *
    (W_enc_dst[dst_indices[n, i]] . W_dec_src[src_indices[n, j]]) * src_values[n, j],
    shape [N, k_dst, k_src] (leading dims flattened)."""
    dtype = attribution_dtype(src_values.dtype)
    k_src, k_dst = src_indices.shape[-1], dst_indices.shape[-1]
    src_rows = W_dec_src.to(dtype)[src_indices.reshape(-1, k_src).long()]  # [N, k_src, d]
    dst_rows = W_enc_dst.to(dtype)[dst_indices.reshape(-1, k_dst).long()]  # [N, k_dst, d]
    virtual_weights = dst_rows @ src_rows.transpose(1, 2)
    scale = dst_scale.reshape(-1, k_dst, 1).to(dtype)
    return scale * virtual_weights * src_values.reshape(-1, 1, k_src).to(dtype)


def edge_rank_key(edges: torch.Tensor) -> torch.Tensor:
    """|E|, with NaN ranking as +inf: the key every backend prunes by."""
    return edges.abs().nan_to_num(nan=float("inf"))


def prune_edges(
    edges: torch.Tensor, top_k: int | None = None, threshold: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-destination pruning of E [N, k_dst, k_src] into the padded form the
    feature_edges op returns: (values [N, k_dst, K], src_slots [N, k_dst, K]),
    K = min(top_k, k_src) (k_src without top_k). Survivors: the top_k largest
    |E| of each destination (ties: lower j), of those the ones with
    |E| >= threshold; top_k orders them by decreasing |E| (ties: lower j),
    threshold alone by increasing j. Slots after the survivors: src_slot -1, value 0."""
    key = edge_rank_key(edges)
    slots = torch.arange(edges.shape[-1], device=edges.device).expand(edges.shape)
    if top_k is not None:
        top_k = min(top_k, edges.shape[-1])
        slots = key.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]
    kept = key.gather(-1, slots) >= threshold if threshold is not None else torch.ones_like(slots, dtype=torch.bool)
    # Survivors first, each group keeping its order (a stable sort on "pruned").
    order = (~kept).to(torch.uint8).sort(dim=-1, stable=True).indices
    slots, kept = slots.gather(-1, order), kept.gather(-1, order)
    values = torch.where(kept, edges.gather(-1, slots), 0)
    return values, torch.where(kept, slots, -1)


def feature_edges(
    src_values: torch.Tensor,
    src_indices: torch.Tensor,
    W_dec_src: torch.Tensor,
    dst_indices: torch.Tensor,
    W_enc_dst: torch.Tensor,
    dst_scale: torch.Tensor,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    reduce: str = "none",
) -> torch.Tensor:
    """Edges between SAE latents through the residual stream, pruned per
    destination: reduce="none" a coalesced sparse COO [..., M_dst, M_src] of the
    surviving (token, destination latent, source latent) edges; "sum" their sum
    over tokens, a coalesced sparse COO [M_dst, M_src]."""
    edges = feature_edge_scores(src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale)
    values, slots = prune_edges(edges, top_k, threshold)
    return sparse_edges(values, slots, src_indices, dst_indices, (W_enc_dst.shape[0], W_dec_src.shape[0]), reduce)


def sparse_edges(
    values: torch.Tensor,
    src_slots: torch.Tensor,
    src_indices: torch.Tensor,
    dst_indices: torch.Tensor,
    latent_shape: tuple[int, int],
    reduce: str,
) -> torch.Tensor:
    """The padded per-destination edges (values, src_slots) [N, k_dst, K] as a
    coalesced sparse COO: [..., M_dst, M_src] per token (reduce="none"), or
    [M_dst, M_src] summed over tokens ("sum"). Slots -1 are left out."""
    N, k_dst, kept = values.shape
    src = src_indices.reshape(N, src_indices.shape[-1]).long()
    src_latents = src.gather(1, src_slots.clamp_min(0).reshape(N, k_dst * kept)).reshape(src_slots.shape)
    dst_latents = dst_indices.reshape(N, k_dst, 1).long().expand(src_slots.shape)
    survivors = (src_slots >= 0).reshape(-1).nonzero().squeeze(1)  # found once, used for every coordinate
    latent_coordinates = [dst_latents.reshape(-1)[survivors], src_latents.reshape(-1)[survivors]]
    kept_values = values.reshape(-1)[survivors]
    if reduce == "sum":
        return torch.sparse_coo_tensor(torch.stack(latent_coordinates), kept_values, latent_shape,
                                       check_invariants=False).coalesce()
    tokens = survivors // (k_dst * kept)
    leading = src_indices.shape[:-1]
    coordinates = torch.stack([*token_coordinates(tokens, leading), *latent_coordinates])
    return torch.sparse_coo_tensor(coordinates, kept_values, (*leading, *latent_shape),
                                   check_invariants=False).coalesce()
