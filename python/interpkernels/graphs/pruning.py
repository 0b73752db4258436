"""Influence, pruning and scores of an attribution graph, on its sparse adjacency.

circuit-tracer 0.5.0 (``graph.py``: ``normalize_matrix``, ``compute_influence``,
``find_threshold``, ``prune_graph``, ``compute_graph_scores``) computes these on
a dense ``[n_nodes, n_nodes]`` matrix and sorts all of its entries to find the
edge threshold. Here every step runs on the non-zero edges of the CSR
adjacency, a block of edges at a time (so no step holds more than a few
bytes per edge besides the adjacency): row normalisation and the influence
power series as sparse products, the edge threshold by a histogram of the
scores and a sort of the one bucket it falls in rather than a sort of all
(zeros add nothing to the cumulative sum, so the threshold is the same; see
:func:`prune` for the one difference, at a threshold of 1).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

import torch

# Edges per block: the temporaries of a step are a few of these.
_BLOCK_EDGES = 2**22


class PrunedGraph(NamedTuple):
    node_mask: torch.Tensor  # [n_nodes] bool: nodes kept
    edges: torch.Tensor  # sparse COO [n_nodes, n_nodes]: the edges kept, with their weights
    cumulative_scores: torch.Tensor  # [n_nodes]: share of total influence of the nodes at least as influential


def edge_blocks(adjacency: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The edges of a sparse CSR adjacency, row-major, in blocks of whole rows
    holding about _BLOCK_EDGES edges (a longer row alone): (the block's range
    of edges, target rows, source columns, values), views but for the rows."""
    crow, columns, values = adjacency.crow_indices(), adjacency.col_indices(), adjacency.values()
    n_rows = crow.shape[0] - 1
    # Rows at which each block starts: one wherever the edge count passes a multiple of _BLOCK_EDGES.
    marks = torch.arange(0, values.shape[0], _BLOCK_EDGES, dtype=crow.dtype, device=crow.device)
    starts = torch.unique(torch.searchsorted(crow[1:], marks, right=True)).tolist() + [n_rows]
    for first, end in zip(starts[:-1], starts[1:]):
        block = slice(int(crow[first]), int(crow[end]))
        rows = torch.repeat_interleave(torch.arange(first, end, device=crow.device),
                                       crow[first + 1:end + 1] - crow[first:end])
        yield block, rows, columns[block], values[block]


def row_sums(adjacency: torch.Tensor, edge_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's sum of |A| (over the edges in `edge_mask` only, if given)."""
    sums = adjacency.values().new_zeros(adjacency.shape[0])
    for block, rows, _, values in edge_blocks(adjacency):
        magnitudes = values.abs()
        if edge_mask is not None:
            magnitudes *= edge_mask[block]
        sums.index_add_(0, rows, magnitudes)
    return sums


def influence(adjacency: torch.Tensor, logit_weights: torch.Tensor, edge_mask: torch.Tensor | None = None,
              max_iter: int = 1000) -> torch.Tensor:
    """``w A + w A^2 + ...`` for the logits' weights w and A the row-normalised
    |adjacency| (circuit-tracer's compute_node_influence: rows divided by their
    sums clamped at 1e-10), of the edges in `edge_mask` only if given; the
    series ends because the graph has no cycle."""
    sums = row_sums(adjacency, edge_mask).clamp_(min=1e-10)

    def times_matrix(vector: torch.Tensor) -> torch.Tensor:
        product = vector.new_zeros(adjacency.shape[1])
        for block, rows, columns, values in edge_blocks(adjacency):
            normalized = values.abs().div_(sums[rows])
            if edge_mask is not None:
                normalized *= edge_mask[block]
            product.index_add_(0, columns, normalized.mul_(vector[rows]))
        return product

    return power_series(times_matrix, logit_weights, max_iter, "influence")


def power_series(times_matrix: Callable[[torch.Tensor], torch.Tensor], weights: torch.Tensor, max_iter: int,
                 what: str) -> torch.Tensor:
    """``w A + w A^2 + ...`` for a square A given by ``times_matrix(v) = v A``, ending at the first
    zero term (A has no cycle); at most `max_iter` products, else RuntimeError naming `what`."""
    current, total = weights, torch.zeros_like(weights)
    for _ in range(max_iter):
        current = times_matrix(current)
        if not current.any():
            return total
        total += current
    raise RuntimeError(f"{what} did not converge in {max_iter} steps: the adjacency has a cycle")


def score_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which the largest scores hold `threshold` of their sum
    (circuit-tracer's find_threshold: the scores sorted descending, the first
    whose running sum reaches `threshold` of the total; the smallest if none,
    and at a threshold of 1). :func:`blockwise_score_threshold` on `scores`."""
    flat = scores.flatten()
    return blockwise_score_threshold(lambda: flat.split(_BLOCK_EDGES), threshold)


def blockwise_score_threshold(blocks: Callable[[], Iterable[torch.Tensor]], threshold: float) -> torch.Tensor:
    """:func:`score_threshold` of the non-negative scores that ``blocks()``
    yields block by block (called twice, so the scores need not be held).

    By selection: a histogram of the scores' leading 16 bits (non-negative
    floats order as their bit patterns) weighted by the scores finds the bucket
    where the running sum crosses, and only that bucket is sorted. Sums in
    float64."""
    def bucketed():
        """(block, each score's bucket); half-precision scores as float32."""
        for block in blocks():
            block = block if block.dtype in _BUCKET_BITS else block.float()
            integer, shift = _BUCKET_BITS[block.dtype]
            yield block, (block.view(integer) >> shift) & 0xFFFF

    bucket_mass = torch.zeros(2**16, dtype=torch.float64)
    bucket_count = torch.zeros(2**16, dtype=torch.int64)
    smallest = None
    for block, buckets in bucketed():
        buckets = buckets.long()
        bucket_mass.index_add_(0, buckets, block.double())
        bucket_count += torch.bincount(buckets, minlength=2**16)
        if block.numel():
            smallest = block.min() if smallest is None else torch.minimum(smallest, block.min())
    if smallest is None:
        raise ValueError("scores: empty")
    if threshold >= 1.0:  # every score: where rounding stops the running sum is moot
        return smallest
    wanted = threshold * float(bucket_mass.sum())
    # Running sum from the largest bucket down: the crossing is the highest
    # non-empty bucket where it reaches `wanted` (the lowest non-empty if none).
    from_top = bucket_mass.flip(0).cumsum(0).flip(0)
    reaching = (from_top >= wanted) & (bucket_count > 0)
    crossing = int(reaching.nonzero().max()) if bool(reaching.any()) else int((bucket_count > 0).nonzero().min())
    above = float(from_top[crossing + 1]) if crossing + 1 < from_top.shape[0] else 0.0
    candidates = torch.cat([block[buckets == crossing] for block, buckets in bucketed()])
    ordered = torch.sort(candidates, descending=True).values
    index = int(torch.searchsorted(above + ordered.cumsum(0, dtype=torch.float64), wanted))
    # Not reached within the bucket (rounding): every score, as the sort's last.
    return ordered[index] if index < ordered.shape[0] else smallest


# Integer view and shift that leave a non-negative float's leading 16 bits.
_BUCKET_BITS = {torch.float32: (torch.int32, 15), torch.float64: (torch.int64, 47)}


def logit_weights(graph) -> torch.Tensor:
    weights = graph.adjacency.values().new_zeros(graph.adjacency.shape[0])
    weights[-graph.logit_tokens.shape[0]:] = graph.logit_probabilities
    return weights


def prune(graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
    """circuit-tracer's prune_graph: keep the nodes holding `node_threshold` of
    the logits' influence (tokens and logits always), then the edges holding
    `edge_threshold` of the edge influence among them, then drop features and
    errors left without an outgoing edge and features left without an
    incoming one, until nothing changes.

    One difference, at an edge threshold of 1 (or one the rounding of the
    cumulative sum cannot reach): circuit-tracer's threshold then falls on a
    zero entry of its dense matrix and keeps every entry, zeros included, so
    no node loses its edges; here only non-zero edges exist.
    """
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    adjacency = graph.adjacency
    n_nodes = adjacency.shape[0]
    n_tokens, n_logits, n_features = graph.tokens.shape[0], graph.logit_tokens.shape[0], graph.n_features
    weights = logit_weights(graph)

    node_influence = influence(adjacency, weights)
    node_mask = node_influence >= score_threshold(node_influence, node_threshold)
    node_mask[-n_logits - n_tokens:] = True

    # Edges between kept nodes, then each one's score: its normalised weight
    # times its target's influence (plus logit weight) in that pruned graph.
    edge_mask = torch.empty(adjacency.values().shape[0], dtype=torch.bool)
    for block, rows, columns, _ in edge_blocks(adjacency):
        edge_mask[block] = node_mask[rows] & node_mask[columns]
    pruned_sums = row_sums(adjacency, edge_mask).clamp_(min=1e-10)
    target_influence = influence(adjacency, weights, edge_mask) + weights

    def edge_scores():
        """Each edge's score, block by block (computed twice rather than held)."""
        for block, rows, _, values in edge_blocks(adjacency):
            yield values.abs().div_(pruned_sums[rows]).mul_(target_influence[rows]).mul_(edge_mask[block])

    edge_threshold_score = blockwise_score_threshold(edge_scores, edge_threshold)
    for (block, _, _, _), scores in zip(edge_blocks(adjacency), edge_scores()):
        edge_mask[block] &= scores >= edge_threshold_score

    sources_end = n_nodes - n_logits - n_tokens  # features and errors: need an outgoing edge
    previous = None
    while previous is None or not torch.equal(previous, node_mask):
        previous = node_mask.clone()
        has_outgoing = torch.zeros(n_nodes, dtype=torch.bool)
        has_incoming = torch.zeros(n_nodes, dtype=torch.bool)
        for block, rows, columns, _ in edge_blocks(adjacency):
            kept = edge_mask[block] & node_mask[rows] & node_mask[columns]
            edge_mask[block] = kept
            has_outgoing[columns[kept].long()] = True
            has_incoming[rows[kept]] = True
        node_mask[:sources_end] &= has_outgoing[:sources_end]
        node_mask[:n_features] &= has_incoming[:n_features]

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative_scores = torch.zeros_like(node_influence)
    cumulative_scores[order] = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    kept_rows = torch.cat([rows[edge_mask[block]] for block, rows, _, _ in edge_blocks(adjacency)])
    kept = torch.stack([kept_rows.long(), adjacency.col_indices()[edge_mask].long()])
    edges = torch.sparse_coo_tensor(kept, adjacency.values()[edge_mask], adjacency.shape, is_coalesced=True,
                                    check_invariants=True)
    return PrunedGraph(node_mask, edges, cumulative_scores)


def scores(graph) -> tuple[float, float]:
    """circuit-tracer's compute_graph_scores: (replacement, completeness).

    Replacement: the share of the tokens' and errors' influence on the logits
    that is the tokens'. Completeness: the share of each node's incoming edge
    mass that does not come from errors, averaged with weights its influence
    plus its logit probability."""
    adjacency = graph.adjacency
    n_tokens, n_features = graph.tokens.shape[0], graph.n_features
    error_start, error_end = n_features, n_features + graph.n_layers * n_tokens
    weights = logit_weights(graph)
    node_influence = influence(adjacency, weights)
    token_influence = node_influence[error_end:error_end + n_tokens].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement = token_influence / (token_influence + error_influence)

    sums = row_sums(adjacency).clamp_(min=1e-10)
    error_share = weights.new_zeros(weights.shape[0])
    for _, rows, columns, values in edge_blocks(adjacency):
        from_errors = (columns >= error_start) & (columns < error_end)
        error_share.index_add_(0, rows[from_errors], values[from_errors].abs() / sums[rows[from_errors]])
    output_influence = node_influence + weights
    completeness = ((1 - error_share) * output_influence).sum() / output_influence.sum()
    return replacement.item(), completeness.item()
