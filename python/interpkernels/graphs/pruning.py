"""Influence, pruning and scores of an attribution graph, on its sparse adjacency.

circuit-tracer 0.5.0 (``graph.py``: ``normalize_matrix``, ``compute_influence``,
``find_threshold``, ``prune_graph``, ``compute_graph_scores``) computes these on
a dense ``[n_nodes, n_nodes]`` matrix and sorts all of its entries to find the
edge threshold. Here every step runs on the non-zero edges: row normalisation
and the influence power series as sparse products, the threshold from a sort
of the non-zero scores only (the zeros it leaves out come last in theirs and
add nothing to the cumulative sum, so the threshold is the same; see
:func:`prune` for the one difference, at a threshold of 1).
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class PrunedGraph(NamedTuple):
    node_mask: torch.Tensor  # [n_nodes] bool: nodes kept
    edges: torch.Tensor  # sparse COO [n_nodes, n_nodes]: the edges kept, with their weights
    cumulative_scores: torch.Tensor  # [n_nodes]: share of total influence of the nodes at least as influential


class Edges(NamedTuple):
    """A graph's non-zero edges as flat arrays, row-major: target rows and
    source columns (int32 from a CSR adjacency) and their values."""

    rows: torch.Tensor
    columns: torch.Tensor
    values: torch.Tensor
    n_nodes: int


def edges_of(adjacency: torch.Tensor) -> Edges:
    """The edges of a sparse CSR (or coalesced COO) adjacency, without copying its columns or values."""
    if adjacency.layout == torch.sparse_csr:
        crow = adjacency.crow_indices()
        rows = torch.repeat_interleave(torch.arange(adjacency.shape[0], dtype=crow.dtype, device=crow.device),
                                       crow.diff())
        return Edges(rows, adjacency.col_indices(), adjacency.values(), adjacency.shape[0])
    rows, columns = adjacency.coalesce().indices()
    return Edges(rows, columns, adjacency.coalesce().values(), adjacency.shape[0])


def row_normalized(edges: Edges) -> Edges:
    """|A| with each row divided by its sum (circuit-tracer's normalize_matrix)."""
    magnitudes = edges.values.abs()
    row_sums = magnitudes.new_zeros(edges.n_nodes).index_add_(0, edges.rows, magnitudes)
    return edges._replace(values=magnitudes.div_(row_sums.clamp(min=1e-10)[edges.rows]))


def influence(normalized: Edges, logit_weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """``w A + w A^2 + ...`` for the logits' weights w (circuit-tracer's
    compute_influence); the series ends because the graph has no cycle."""

    def times_matrix(vector: torch.Tensor) -> torch.Tensor:
        return vector.new_zeros(normalized.n_nodes).index_add_(0, normalized.columns,
                                                              vector[normalized.rows] * normalized.values)

    current = times_matrix(logit_weights)
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = times_matrix(current)
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} steps: the adjacency has a cycle")


def score_threshold(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """The score above which the largest scores hold `threshold` of their sum
    (circuit-tracer's find_threshold)."""
    ordered = torch.sort(scores, descending=True).values
    cumulative = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    index = min(int(torch.searchsorted(cumulative, threshold).item()), ordered.shape[0] - 1)
    return ordered[index]


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
    n_nodes = graph.adjacency.shape[0]
    n_tokens, n_logits, n_features = graph.tokens.shape[0], graph.logit_tokens.shape[0], graph.n_features
    weights = logit_weights(graph)
    edges = edges_of(graph.adjacency)

    node_influence = influence(row_normalized(edges), weights)
    node_mask = node_influence >= score_threshold(node_influence, node_threshold)
    node_mask[-n_logits - n_tokens:] = True

    between_kept = node_mask[edges.rows] & node_mask[edges.columns]
    pruned = Edges(edges.rows[between_kept], edges.columns[between_kept], edges.values[between_kept], n_nodes)
    del edges, between_kept
    normalized = row_normalized(pruned)
    pruned_influence = influence(normalized, weights) + weights
    edge_scores = normalized.values.mul_(pruned_influence[pruned.rows])
    edge_mask = edge_scores >= score_threshold(edge_scores, edge_threshold)
    del normalized, edge_scores

    rows, columns = pruned.rows, pruned.columns
    sources_end = n_nodes - n_logits - n_tokens  # features and errors: need an outgoing edge
    previous = None
    while previous is None or not torch.equal(previous, node_mask):
        previous = node_mask.clone()
        edge_mask &= node_mask[rows] & node_mask[columns]
        has_outgoing = torch.zeros(n_nodes, dtype=torch.bool).index_fill_(0, columns[edge_mask].long(), True)
        has_incoming = torch.zeros(n_nodes, dtype=torch.bool).index_fill_(0, rows[edge_mask].long(), True)
        node_mask[:sources_end] &= has_outgoing[:sources_end]
        node_mask[:n_features] &= has_incoming[:n_features]

    ordered, order = torch.sort(node_influence, descending=True)
    cumulative_scores = torch.zeros_like(node_influence)
    cumulative_scores[order] = torch.cumsum(ordered, dim=0) / torch.sum(ordered)
    kept = torch.stack([rows[edge_mask], columns[edge_mask]]).long()
    return PrunedGraph(node_mask, torch.sparse_coo_tensor(kept, pruned.values[edge_mask], graph.adjacency.shape,
                                                          is_coalesced=True, check_invariants=True),
                       cumulative_scores)


def scores(graph) -> tuple[float, float]:
    """circuit-tracer's compute_graph_scores: (replacement, completeness).

    Replacement: the share of the tokens' and errors' influence on the logits
    that is the tokens'. Completeness: the share of each node's incoming edge
    mass that does not come from errors, averaged with weights its influence
    plus its logit probability."""
    n_tokens, n_features = graph.tokens.shape[0], graph.n_features
    error_start, error_end = n_features, n_features + graph.n_layers * n_tokens
    weights = logit_weights(graph)
    normalized = row_normalized(edges_of(graph.adjacency))
    node_influence = influence(normalized, weights)
    token_influence = node_influence[error_end:error_end + n_tokens].sum()
    error_influence = node_influence[error_start:error_end].sum()
    replacement = token_influence / (token_influence + error_influence)

    from_errors = (normalized.columns >= error_start) & (normalized.columns < error_end)
    error_share = weights.new_zeros(weights.shape[0]).index_add_(0, normalized.rows[from_errors],
                                                                 normalized.values[from_errors])
    output_influence = node_influence + weights
    completeness = ((1 - error_share) * output_influence).sum() / output_influence.sum()
    return replacement.item(), completeness.item()
