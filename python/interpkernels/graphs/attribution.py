"""Attribution graphs (circuit tracing) of a prompt, as circuit-tracer 0.5.0 defines them.

The local replacement model (circuit-tracer ``replacement_model/``): attention
patterns and LayerNorm scales frozen at their values on the prompt, each MLP
replaced by its transcoder with the transcoder's error added as a constant
(a skip connection ``x @ W_skip.T`` stays, linear).
It is linear from feature activations to every later feature pre-activation
and logit. An edge (target <- source) is the source's activation times its
decoder row (or the error / token-embedding vector) contracted with the
gradient of the target's pre-activation (encoder row) or de-meaned logit
(unembedding column less the vocabulary mean) at the source's site, with the
gradient taken through the frozen model only (no path through another
transcoder: direct effects).

Node order, as circuit-tracer's ``attribute()`` and ``Graph``: active
features sorted by (layer, position, latent), one error node per (layer,
position) at ``n_features + layer * n_pos + pos``, one token node per
position, then the logits. Features and errors at position 0 (BOS) are zeroed.

Computed here with one forward pass and batched vector-Jacobian products
(``is_grads_batched``) through it, not ``batch_size`` copies of the forward
pass; feature edges by ``gathered_dot`` over each position's own features;
every batch of rows is reduced to sparse (row, column, value) triples before
the next, so the only dense edge block is one batch's ``[batch, sources]``,
never ``[all rows, nodes]`` or ``[nodes, nodes]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interpkernels._progress import Progress
from interpkernels.graphs import export, pruning
from interpkernels.graphs.pruning import PrunedGraph
from interpkernels.graphs.transcoders import DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK, TranscoderSet
from interpkernels.nn import Transcoder

# circuit-tracer's mlp.hook_in / mlp.hook_out (its wrapper around each MLP) are,
# on a plain HookedTransformer, the output of ln2 and the block's hook_mlp_out.
_INPUT_SITE = "blocks.{layer}.ln2.hook_normalized"
_OUTPUT_SITE = "blocks.{layer}.hook_mlp_out"
# First position whose features and errors count (circuit-tracer zeroes BOS's).
_FIRST_POSITION = 1


@dataclass
class AttributionGraph:
    """An unpruned attribution graph, in circuit-tracer's node order.

    active_features ``[n_features, 3]`` (layer, position, latent);
    activation_values ``[n_features]``; selected_features: the features whose
    rows were computed (all of them here); logit_tokens, logit_probabilities
    ``[n_logits]``; adjacency: sparse COO ``[n_nodes, n_nodes]``, rows targets,
    columns sources (feature rows and logit rows filled; error and token rows
    empty), exact zeros left out.
    """

    tokens: torch.Tensor  # [n_pos]
    n_layers: int
    active_features: torch.Tensor
    activation_values: torch.Tensor
    selected_features: torch.Tensor
    logit_tokens: torch.Tensor
    logit_probabilities: torch.Tensor
    adjacency: torch.Tensor

    @property
    def n_features(self) -> int:
        return self.active_features.shape[0]

    def error_node(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.tokens.shape[0] + position

    def token_node(self, position: int) -> int:
        return self.n_features + self.n_layers * self.tokens.shape[0] + position

    def logit_node(self, index: int) -> int:
        return self.adjacency.shape[0] - self.logit_tokens.shape[0] + index

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PrunedGraph:
        """circuit-tracer's prune_graph, on the sparse adjacency (interpkernels.graphs.pruning.prune)."""
        return pruning.prune(self, node_threshold, edge_threshold)

    def scores(self) -> tuple[float, float]:
        """(replacement, completeness), circuit-tracer's compute_graph_scores."""
        return pruning.scores(self)

    def save_json(self, path, tokenizer, *, scan: str, slug: str | None = None, node_threshold: float = 0.8,
                  edge_threshold: float = 0.98) -> None:
        """circuit-tracer's frontend JSON of this graph pruned at these
        thresholds, as their create_graph_files writes it (interpkernels.graphs.export.save_json)."""
        export.save_json(self, path, tokenizer, scan=scan, slug=slug, node_threshold=node_threshold,
                         edge_threshold=edge_threshold)

    def to_circuit_tracer_file(self, path, model, tokenizer=None, *, scan: str | list[str] | None = None) -> None:
        """The file circuit-tracer's Graph.to_pt writes; their Graph.from_pt opens it
        (interpkernels.graphs.export.save_circuit_tracer_graph)."""
        export.save_circuit_tracer_graph(self, path, model, tokenizer, scan=scan)

    def to_circuit_tracer(self, model, tokenizer=None, *, scan: str | list[str] | None = None):
        """circuit-tracer's ``Graph`` of this graph, where circuit-tracer imports
        (interpkernels.graphs.export.circuit_tracer_graph); arguments as
        :meth:`to_circuit_tracer_file`."""
        return export.circuit_tracer_graph(self, model, tokenizer, scan=scan)


@dataclass
class _LayerCode:
    """Active features of one layer, sorted by (position, latent)."""

    positions: torch.Tensor  # [n]
    latents: torch.Tensor  # [n]
    values: torch.Tensor  # [n] activations
    scaled_decoders: torch.Tensor  # [n, d]: activation times decoder row
    encoders: torch.Tensor  # [n, d]
    errors: torch.Tensor  # [n_pos, d]: MLP output less the reconstruction, zero at BOS
    # The features of each position as gathered_dot's indices: [n_pos, most at one
    # position], padded with 0; feature i sits at flat slot position_slots[i].
    slots: torch.Tensor
    position_slots: torch.Tensor


def _check_transcoders(transcoders: TranscoderSet | Sequence[Transcoder], n_layers: int) -> list[Transcoder]:
    if isinstance(transcoders, TranscoderSet) and (
            (transcoders.feature_input_hook, transcoders.feature_output_hook) != (DEFAULT_INPUT_HOOK,
                                                                                  DEFAULT_OUTPUT_HOOK)):
        raise ValueError(f"transcoders: read {transcoders.feature_input_hook!r} and write "
                         f"{transcoders.feature_output_hook!r}; only {DEFAULT_INPUT_HOOK!r} -> "
                         f"{DEFAULT_OUTPUT_HOOK!r} (the MLP's input and output) is supported yet")
    layers = list(transcoders)
    if len(layers) != n_layers:
        raise ValueError(f"transcoders: {len(layers)} given for a model of {n_layers} layers")
    for layer, transcoder in enumerate(layers):
        if not isinstance(transcoder, Transcoder):
            raise TypeError(f"transcoders[{layer}]: expected an interpkernels Transcoder, "
                            f"got {type(transcoder).__name__}")
    return layers


def _frozen_forward(model, tokens: torch.Tensor, per_layer: list[Transcoder]):
    """One forward pass of the local replacement model's linear skeleton.

    Returns the logits, the MLP inputs (attached to the graph), the MLP outputs
    (leaves: gradients stop there, as at a replaced MLP, except through a
    transcoder's skip connection, which circuit-tracer keeps linear: the
    output is ``leaf + skip(x) - skip(x).detach()``), the token embeddings (a
    leaf) and the unembedding's input (attached).
    """
    n_layers = len(per_layer)
    mlp_inputs: list[torch.Tensor | None] = [None] * n_layers
    mlp_outputs: list[torch.Tensor | None] = [None] * n_layers
    leaves: dict[str, torch.Tensor] = {}

    def freeze(acts, hook):
        return acts.detach()

    def record_input(acts, hook, layer):
        mlp_inputs[layer] = acts
        return acts

    def cut_output(acts, hook, layer):
        mlp_outputs[layer] = acts.detach().requires_grad_()
        if per_layer[layer].W_skip is None:
            return mlp_outputs[layer]
        skip = mlp_inputs[layer] @ per_layer[layer].W_skip.T
        return mlp_outputs[layer] + (skip - skip.detach())

    def cut_embedding(acts, hook):
        leaves["embedding"] = acts.detach().requires_grad_()
        return leaves["embedding"]

    def record_unembedding_input(acts, hook):
        leaves["unembedding_input"] = acts
        return acts

    hooks = [(name, freeze) for name in model.hook_dict
             if name.endswith(("attn.hook_pattern", "hook_scale"))]
    for layer in range(n_layers):
        hooks.append((_INPUT_SITE.format(layer=layer), lambda acts, hook, layer=layer: record_input(acts, hook, layer)))
        hooks.append((_OUTPUT_SITE.format(layer=layer), lambda acts, hook, layer=layer: cut_output(acts, hook, layer)))
    hooks += [("hook_embed", cut_embedding), ("ln_final.hook_normalized", record_unembedding_input)]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    return logits[0, -1].detach(), mlp_inputs, mlp_outputs, leaves["embedding"], leaves["unembedding_input"]


def _layer_code(transcoder: Transcoder, mlp_input: torch.Tensor, mlp_output: torch.Tensor) -> _LayerCode:
    """The active features of one layer, sorted by (position, latent), BOS's zeroed."""
    with torch.no_grad():
        values, indices = transcoder.encode(mlp_input)
        values = values.clone()
        values[:_FIRST_POSITION] = 0
        errors = mlp_output - transcoder.reconstruct(mlp_input, values, indices)
        errors[:_FIRST_POSITION] = 0
        positions, slots = (values > 0).nonzero(as_tuple=True)
        latents = indices[positions, slots]
        order = torch.argsort(positions * transcoder.num_latents + latents)
        positions, latents, active = positions[order], latents[order], values[positions, slots][order]
        per_position = torch.bincount(positions, minlength=mlp_input.shape[0])
        first_of_position = torch.cumsum(per_position, 0) - per_position
        rank = torch.arange(positions.shape[0], device=positions.device) - first_of_position[positions]
        width = int(per_position.max())
        feature_slots = positions.new_zeros(mlp_input.shape[0], width)
        feature_slots[positions, rank] = torch.arange(positions.shape[0], device=positions.device)
        return _LayerCode(positions, latents, active, active[:, None] * transcoder.W_dec[latents],
                          transcoder.W_enc[latents], errors, feature_slots, positions * width + rank)


def _salient_logits(final_logits: torch.Tensor, W_U: torch.Tensor, max_n_logits: int, desired_logit_prob: float):
    """circuit-tracer's AttributionTargets._from_salient: the most probable
    tokens until their mass reaches desired_logit_prob (at most max_n_logits),
    with their de-meaned unembedding columns."""
    probabilities = torch.softmax(final_logits, dim=-1)
    top_probabilities, top_tokens = torch.topk(probabilities, max_n_logits)
    cutoff = int(torch.searchsorted(torch.cumsum(top_probabilities, 0), desired_logit_prob)) + 1
    tokens = top_tokens[:cutoff]
    vectors = (W_U[:, tokens] - W_U.mean(dim=-1, keepdim=True)).T
    return tokens, probabilities[tokens], vectors.detach()


def _source_columns(codes: list[_LayerCode], n_features: int, n_pos: int, device) -> torch.Tensor:
    """Node index of each source, in the order of :func:`_edges_of_batch`: per
    layer its features then its errors, then the tokens."""
    columns, feature_start = [], 0
    for layer, code in enumerate(codes):
        columns.append(torch.arange(feature_start, feature_start + code.latents.shape[0], device=device))
        columns.append(n_features + layer * n_pos + torch.arange(n_pos, device=device))
        feature_start += code.latents.shape[0]
    columns.append(n_features + len(codes) * n_pos + torch.arange(n_pos, device=device))
    return torch.cat(columns)


def _edges_of_batch(gradients, codes: list[_LayerCode], token_vectors: torch.Tensor):
    """Dense edges ``[batch, sources reached]`` of one batch of targets from the
    gradients at every MLP output and at the token embeddings, and the mask of
    the sources they reach within :func:`_source_columns` (a layer no target
    of the batch reads past has no gradient)."""
    edges, reached = [], []
    for gradient, code in zip(gradients[:-1], codes):
        n_sources = code.latents.shape[0] + code.errors.shape[0]
        reached.append(torch.full((n_sources,), gradient is not None, device=token_vectors.device))
        if gradient is not None:
            gradient = gradient[:, 0]  # [batch, n_pos, d]
            size = gradient.shape[0]
            # Each (target, position) row dotted with the scaled decoders of that position's
            # features only (a sampled dense-dense product), not a [batch, features, d] gather.
            dots = torch.ops.interpkernels.gathered_dot(gradient.reshape(-1, gradient.shape[-1]),
                                                        code.slots.repeat(size, 1), code.scaled_decoders)
            edges.append(dots.view(size, -1)[:, code.position_slots])
            edges.append(torch.einsum("bpd,pd->bp", gradient, code.errors))
    # Every target reads past the embedding.
    edges.append(torch.einsum("bpd,pd->bp", gradients[-1][:, 0], token_vectors))
    reached.append(torch.ones(token_vectors.shape[0], dtype=torch.bool, device=token_vectors.device))
    return torch.cat(edges, dim=1), torch.cat(reached)


def attribution_graph(model, transcoders: TranscoderSet | Sequence[Transcoder], tokens: torch.Tensor, *,
                      max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                      batch_size: int = 64, progress: bool = True) -> AttributionGraph:
    """The attribution graph of `tokens` (1-D, BOS first) on a TransformerLens
    ``HookedTransformer`` (tested: GPT-2 style, LayerNorm and learned
    positions; Llama style, RMSNorm, rotary and gated MLP) with one
    per-layer transcoder per layer (with or without a skip connection), reading the MLP's
    input and writing its output; equal to circuit-tracer 0.5.0's
    ``attribute(tokens, ReplacementModel(model, transcoders),
    max_n_logits=..., desired_logit_prob=...)`` with every feature's row
    computed (its max_feature_nodes=None). batch_size: target rows per
    vector-Jacobian product. progress: the rows done, on stderr
    (interpkernels._progress.Progress; False: silent).

    A transcoder's code is used as it encodes: give JumpReLU transcoders
    ``k = num_latents`` (load_transcoders' default) to keep every active latent.
    """
    n_layers = model.cfg.n_layers
    per_layer = _check_transcoders(transcoders, n_layers)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens: expected a 1-D int64 or int32 tensor, got {tokens!r:.80}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n_pos = tokens.shape[0]

    final_logits, mlp_inputs, mlp_outputs, embedding, unembedding_input = _frozen_forward(model, tokens, per_layer)
    codes = [_layer_code(transcoder, mlp_inputs[layer][0].detach(), mlp_outputs[layer][0].detach())
             for layer, transcoder in enumerate(per_layer)]
    logit_tokens, logit_probabilities, logit_vectors = _salient_logits(
        final_logits, model.W_U, max_n_logits, desired_logit_prob)

    n_features = sum(code.latents.shape[0] for code in codes)
    token_offset = n_features + n_layers * n_pos
    logit_offset = token_offset + n_pos
    n_nodes = logit_offset + logit_tokens.shape[0]
    device = final_logits.device
    # Source columns of one batch's rows, in the order _edges_of_batch lays them out.
    source_columns = _source_columns(codes, n_features, n_pos, device)

    # Targets as circuit-tracer visits them: logits (at the unembedding's input,
    # last position), then features (at their layer's MLP input).
    n_logits = logit_tokens.shape[0]
    target_sites = torch.cat([torch.full((n_logits,), n_layers, device=device)]
                             + [torch.full_like(code.positions, layer) for layer, code in enumerate(codes)]).tolist()
    target_positions = torch.cat([torch.full((n_logits,), n_pos - 1, device=device)]
                                 + [code.positions for code in codes]).tolist()
    target_vectors = torch.cat([logit_vectors] + [code.encoders for code in codes])
    target_rows = torch.cat([torch.arange(logit_offset, n_nodes, device=device), torch.arange(n_features, device=device)])

    sites = [*mlp_inputs, unembedding_input]
    leaves = [*mlp_outputs, embedding]
    token_vectors = embedding[0].detach()
    rows, columns, values = [], [], []
    bar = Progress(target_rows.shape[0], "row", progress)
    for start in range(0, target_rows.shape[0], batch_size):
        batch = slice(start, start + batch_size)
        seeds = [site.new_zeros(target_rows[batch].shape[0], *site.shape) for site in sites]
        for member, (site, position, vector) in enumerate(zip(target_sites[batch], target_positions[batch],
                                                               target_vectors[batch])):
            seeds[site][member, 0, position] = vector
        gradients = torch.autograd.grad(sites, leaves, seeds, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        batch_edges, reached = _edges_of_batch(gradients, codes, token_vectors)
        member, column = batch_edges.nonzero(as_tuple=True)
        rows.append(target_rows[batch][member])
        columns.append(source_columns[reached][column])
        values.append(batch_edges[member, column])
        bar.advance(seeds[0].shape[0])
        if bar.due():
            bar.show(f"attributed {bar.done:,} of {bar.total:,} rows", f"{sum(map(len, values)):,} edges")
    bar.close()

    adjacency = torch.sparse_coo_tensor(torch.stack([torch.cat(rows), torch.cat(columns)]), torch.cat(values),
                                        (n_nodes, n_nodes), check_invariants=True).coalesce()
    active_features = torch.cat([torch.stack([torch.full_like(code.positions, layer), code.positions, code.latents], 1)
                                 for layer, code in enumerate(codes)])
    return AttributionGraph(tokens, n_layers, active_features, torch.cat([code.values for code in codes]),
                            torch.arange(n_features), logit_tokens, logit_probabilities.detach(), adjacency)
