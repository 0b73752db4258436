"""Attribution graphs (circuit tracing) of a prompt, as circuit-tracer 0.5.0 defines them.

The local replacement model (circuit-tracer ``replacement_model/``): attention
patterns and LayerNorm scales frozen at their values on the prompt, each MLP
replaced by its transcoder with the transcoder's error added as a constant
(a skip connection ``x @ W_skip.T`` stays, linear). A cross-layer
transcoder's layer-l feature writes to the MLP outputs of layers l..L-1 (one
decoder row for each); each layer's error is that MLP output less the sum
of what every feature of layers <= l writes there.
It is linear from feature activations to every later feature pre-activation
and logit. An edge (target <- source) is the source's activation times its
decoder row (or the error / token-embedding vector) contracted with the
gradient of the target's pre-activation (encoder row) or de-meaned logit
(unembedding column less the vocabulary mean) at the source's site (for a
cross-layer feature, summed over the sites it writes to), with the
gradient taken through the frozen model only (no path through another
transcoder: direct effects).

Node order, as circuit-tracer's ``attribute()`` and ``Graph``: the selected
features (those whose rows were computed; all unless ``max_feature_nodes``)
sorted by (layer, position, latent), one error node per (layer, position) at
``n_features + layer * n_pos + pos``, one token node per position, then the
logits. Features and errors at position 0 (BOS) are zeroed.

Computed here with one forward pass and batched vector-Jacobian products
(``is_grads_batched``) through it, not ``batch_size`` copies of the forward
pass; feature edges by ``gathered_dot`` over each position's own features.
Rows are scheduled as circuit-tracer schedules them (:func:`_feature_schedule`),
each pass's dense ``[rows, sources]`` block is cut at once to its kept edges
(:func:`_kept_edges`, ``edge_mass``) and stored compactly (:class:`_RowStore`),
then written into an int32 CSR adjacency: never ``[all rows, nodes]`` or
``[nodes, nodes]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from interpkernels._progress import Progress
from interpkernels.graphs import export, pruning
from interpkernels.graphs.pruning import PrunedGraph
from interpkernels.graphs.transcoders import (DEFAULT_INPUT_HOOK, DEFAULT_OUTPUT_HOOK, HookedCrossLayerTranscoder,
                                              TranscoderSet)
from interpkernels.nn import CrossLayerTranscoder, Transcoder

Transcoders = TranscoderSet | HookedCrossLayerTranscoder | CrossLayerTranscoder | Sequence[Transcoder]

# circuit-tracer's mlp.hook_in / mlp.hook_out (its wrapper around each MLP) are,
# on a plain HookedTransformer, the output of ln2 and the block's hook_mlp_out.
_INPUT_SITE = "blocks.{layer}.ln2.hook_normalized"
_OUTPUT_SITE = "blocks.{layer}.hook_mlp_out"
# First position whose features and errors count (circuit-tracer zeroes BOS's).
_FIRST_POSITION = 1


@dataclass
class AttributionGraph:
    """An unpruned attribution graph, in circuit-tracer's node order.

    active_features ``[n_active, 3]`` (layer, position, latent);
    activation_values ``[n_active]``; selected_features: the indices into
    active_features whose rows were computed, ascending (all of them unless
    max_feature_nodes was given): the graph's feature nodes; logit_tokens,
    logit_probabilities ``[n_logits]``; adjacency: sparse CSR ``[n_nodes,
    n_nodes]`` (int32 indices), rows targets, columns sources (feature rows and
    logit rows filled; error and token rows empty), exact zeros left out, and
    with edge_mass < 1 the edges each row dropped.
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
        """Feature nodes of the adjacency: the selected features."""
        return self.selected_features.shape[0]

    def error_node(self, layer: int, position: int) -> int:
        return self.n_features + layer * self.tokens.shape[0] + position

    def token_node(self, position: int) -> int:
        return self.n_features + self.n_layers * self.tokens.shape[0] + position

    def logit_node(self, index: int) -> int:
        return self.adjacency.shape[0] - self.logit_tokens.shape[0] + index

    def edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every stored edge as (targets, sources, weights) ``[n_edges]``,
        row-major (targets ascending, sources ascending within a row): the CSR
        adjacency's triples, with int64 indices built here (16 bytes an edge on
        top of the adjacency)."""
        crow = self.adjacency.crow_indices().long()
        targets = torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device), crow.diff())
        return targets, self.adjacency.col_indices().long(), self.adjacency.values()

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
    # [outputs, n, d]: activation times decoder row for each MLP output the features
    # write to: this layer's, then (a cross-layer transcoder's) each later layer's.
    scaled_decoders: torch.Tensor
    encoders: torch.Tensor  # [n, d]
    errors: torch.Tensor  # [n_pos, d]: MLP output less the reconstruction, zero at BOS
    # The features of each position as gathered_dot's indices: [n_pos, most at one
    # position], padded with 0; feature i sits at flat slot position_slots[i].
    slots: torch.Tensor
    position_slots: torch.Tensor


def _check_transcoders(transcoders: Transcoders, n_layers: int) -> list[Transcoder] | CrossLayerTranscoder:
    """The per-layer transcoders, or the cross-layer transcoder, checked against the model."""
    if isinstance(transcoders, (TranscoderSet, HookedCrossLayerTranscoder)) and (
            (transcoders.feature_input_hook, transcoders.feature_output_hook) != (DEFAULT_INPUT_HOOK,
                                                                                  DEFAULT_OUTPUT_HOOK)):
        raise ValueError(f"transcoders: read {transcoders.feature_input_hook!r} and write "
                         f"{transcoders.feature_output_hook!r}; only {DEFAULT_INPUT_HOOK!r} -> "
                         f"{DEFAULT_OUTPUT_HOOK!r} (the MLP's input and output) is supported yet")
    if isinstance(transcoders, HookedCrossLayerTranscoder):
        transcoders = transcoders.transcoder
    if isinstance(transcoders, CrossLayerTranscoder):
        if transcoders.config["num_layers"] != n_layers:
            raise ValueError(f"transcoders: a cross-layer transcoder of {transcoders.config['num_layers']} layers "
                             f"for a model of {n_layers} layers")
        return transcoders
    layers = list(transcoders)
    if len(layers) != n_layers:
        raise ValueError(f"transcoders: {len(layers)} given for a model of {n_layers} layers")
    for layer, transcoder in enumerate(layers):
        if not isinstance(transcoder, Transcoder):
            raise TypeError(f"transcoders[{layer}]: expected an interpkernels Transcoder, "
                            f"got {type(transcoder).__name__}")
    return layers


def _mixed_by_pattern(pattern: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Attention's ``z`` ``[1, query, head, d_head]`` from a frozen (detached)
    pattern ``[1, head, query, key]`` and the values ``[1, key, head, d_head]``,
    one head at a time as ``(v^T P^T)^T``: the backward is then ``dz^T P`` with
    the 2-D pattern on the right, which a batched vector-Jacobian product
    folds into one matrix product over every row. TransformerLens'
    ``pattern @ v`` instead copies the pattern once per row of the batch."""
    if values.shape[2] != pattern.shape[1]:  # grouped-query attention: key/value heads shared
        values = values.repeat_interleave(pattern.shape[1] // values.shape[2], dim=2)
    heads = [(values[0, :, head].T @ pattern[0, head].T).T for head in range(pattern.shape[1])]
    return torch.stack(heads, dim=1)[None]


def _frozen_attention_hooks(model) -> list:
    """Hooks freezing every attention pattern at its value on the prompt and
    mixing the values by it with :func:`_mixed_by_pattern` (same ``z``)."""
    patterns, values = {}, {}

    def freeze_pattern(acts, hook):
        patterns[hook.name] = acts.detach()
        return patterns[hook.name]

    def record_values(acts, hook):
        values[hook.name] = acts
        return acts

    def mix(acts, hook):
        prefix = hook.name.removesuffix("hook_z")
        return _mixed_by_pattern(patterns.pop(prefix + "hook_pattern"), values.pop(prefix + "hook_v"))

    hooks = []
    for name in model.hook_dict:
        if name.endswith("attn.hook_pattern"):
            prefix = name.removesuffix("hook_pattern")
            hooks += [(name, freeze_pattern), (prefix + "hook_v", record_values), (prefix + "hook_z", mix)]
    return hooks


def _skip_weights(transcoders: list[Transcoder] | CrossLayerTranscoder) -> list[torch.Tensor | None]:
    """Each layer's linear skip ``W_skip`` (None: none; a cross-layer transcoder has none)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return [None] * transcoders.config["num_layers"]
    return [transcoder.W_skip for transcoder in transcoders]


def _frozen_forward(model, tokens: torch.Tensor, skip_weights: list[torch.Tensor | None]):
    """One forward pass of the local replacement model's linear skeleton.

    Returns the logits, the MLP inputs (attached to the graph), the MLP outputs
    (leaves: gradients stop there, as at a replaced MLP, except through a
    transcoder's skip connection, which circuit-tracer keeps linear: the
    output is ``leaf + skip(x) - skip(x).detach()``), the token embeddings (a
    leaf) and the unembedding's input (attached).
    """
    n_layers = len(skip_weights)
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
        if skip_weights[layer] is None:
            return mlp_outputs[layer]
        skip = mlp_inputs[layer] @ skip_weights[layer].T
        return mlp_outputs[layer] + (skip - skip.detach())

    def cut_embedding(acts, hook):
        leaves["embedding"] = acts.detach().requires_grad_()
        return leaves["embedding"]

    def record_unembedding_input(acts, hook):
        leaves["unembedding_input"] = acts
        return acts

    hooks = [(name, freeze) for name in model.hook_dict if name.endswith("hook_scale")]
    hooks += _frozen_attention_hooks(model)
    for layer in range(n_layers):
        hooks.append((_INPUT_SITE.format(layer=layer), lambda acts, hook, layer=layer: record_input(acts, hook, layer)))
        hooks.append((_OUTPUT_SITE.format(layer=layer), lambda acts, hook, layer=layer: cut_output(acts, hook, layer)))
    hooks += [("hook_embed", cut_embedding), ("ln_final.hook_normalized", record_unembedding_input)]
    with torch.enable_grad():
        logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)
    return logits[0, -1].detach(), mlp_inputs, mlp_outputs, leaves["embedding"], leaves["unembedding_input"]


def _layer_code(values: torch.Tensor, indices: torch.Tensor, num_latents: int, errors: torch.Tensor,
                decoders: torch.Tensor, W_enc: torch.Tensor) -> _LayerCode:
    """The active features of one layer's code ``(values, indices) [n_pos, k]``
    (BOS's already zeroed), sorted by (position, latent), with their encoder
    rows and their activations times their decoder rows ``decoders [M, outputs, d]``."""
    with torch.no_grad():
        positions, slots = (values > 0).nonzero(as_tuple=True)
        latents = indices[positions, slots]
        order = torch.argsort(positions * num_latents + latents)
        positions, latents, active = positions[order], latents[order], values[positions, slots][order]
        n_pos = values.shape[0]
        per_position = torch.bincount(positions, minlength=n_pos)
        first_of_position = torch.cumsum(per_position, 0) - per_position
        rank = torch.arange(positions.shape[0], device=positions.device) - first_of_position[positions]
        width = int(per_position.max())
        feature_slots = positions.new_zeros(n_pos, width)
        feature_slots[positions, rank] = torch.arange(positions.shape[0], device=positions.device)
        scaled_decoders = (active[:, None, None] * decoders[latents]).transpose(0, 1).contiguous()
        return _LayerCode(positions, latents, active, scaled_decoders, W_enc[latents], errors, feature_slots,
                          positions * width + rank)


def _zero_bos(values: torch.Tensor) -> torch.Tensor:
    values = values.clone()
    values[:_FIRST_POSITION] = 0
    return values


def _per_layer_codes(per_layer: list[Transcoder], mlp_inputs: list[torch.Tensor],
                     mlp_outputs: list[torch.Tensor]) -> list[_LayerCode]:
    codes = []
    with torch.no_grad():
        for transcoder, x, y in zip(per_layer, mlp_inputs, mlp_outputs):
            values, indices = transcoder.encode(x)
            values = _zero_bos(values)
            errors = _zero_bos(y - transcoder.reconstruct(x, values, indices))
            codes.append(_layer_code(values, indices, transcoder.num_latents, errors, transcoder.W_dec[:, None],
                                     transcoder.W_enc))
    return codes


def _cross_layer_codes(transcoder: CrossLayerTranscoder, mlp_inputs: list[torch.Tensor],
                       mlp_outputs: list[torch.Tensor]) -> list[_LayerCode]:
    """circuit-tracer's CrossLayerTranscoder.compute_attribution_components: each
    layer's error is its MLP output less the decode of every layer's code (BOS's zeroed)."""
    with torch.no_grad():
        layer_codes = [(_zero_bos(values), indices) for values, indices in
                       (transcoder.encode_layer(layer, x) for layer, x in enumerate(mlp_inputs))]
        reconstructions = transcoder.decode(layer_codes)
        return [_layer_code(values, indices, transcoder.num_latents, _zero_bos(y - reconstruction),
                            transcoder.W_dec[layer], transcoder.W_enc[layer])
                for layer, ((values, indices), y, reconstruction)
                in enumerate(zip(layer_codes, mlp_outputs, reconstructions))]


def _codes(transcoders: list[Transcoder] | CrossLayerTranscoder, mlp_inputs: list[torch.Tensor],
           mlp_outputs: list[torch.Tensor]) -> list[_LayerCode]:
    """Every layer's active features and errors on the prompt (MLP inputs and outputs ``[n_pos, d]``)."""
    if isinstance(transcoders, CrossLayerTranscoder):
        return _cross_layer_codes(transcoders, mlp_inputs, mlp_outputs)
    return _per_layer_codes(transcoders, mlp_inputs, mlp_outputs)


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


@dataclass
class _Targets:
    """Every row's target, as circuit-tracer visits them: target ``t < n_logits``
    is logit t (read at the unembedding's input, last position), target
    ``n_logits + f`` is feature f in node order (read at its layer's MLP input)."""

    sites: torch.Tensor  # [n_targets]: the layer whose MLP input is read, n_layers for the unembedding's input
    positions: torch.Tensor  # [n_targets]
    nodes: torch.Tensor  # [n_targets]: the target's node index before unselected features are dropped
    logit_vectors: torch.Tensor  # [n_logits, d]
    encoders: list[torch.Tensor]  # per layer [n, d]
    feature_starts: list[int]  # per layer, its first feature's index

    def vectors(self, targets: torch.Tensor) -> torch.Tensor:
        """The vector each target reads at its site: encoder row or de-meaned unembedding column."""
        n_logits = self.logit_vectors.shape[0]
        vectors = self.logit_vectors.new_empty(targets.shape[0], self.logit_vectors.shape[1])
        is_logit = targets < n_logits
        vectors[is_logit] = self.logit_vectors[targets[is_logit]]
        for layer in self.sites[targets[~is_logit]].unique().tolist():
            of_layer = (~is_logit) & (self.sites[targets] == layer)
            vectors[of_layer] = self.encoders[layer][targets[of_layer] - n_logits - self.feature_starts[layer]]
        return vectors


def _targets(codes: list[_LayerCode], logit_vectors: torch.Tensor, n_pos: int) -> _Targets:
    n_layers, n_logits = len(codes), logit_vectors.shape[0]
    n_features = sum(code.latents.shape[0] for code in codes)
    logit_offset = n_features + (n_layers + 1) * n_pos
    device = logit_vectors.device
    sites = torch.cat([torch.full((n_logits,), n_layers, device=device)]
                      + [torch.full_like(code.positions, layer) for layer, code in enumerate(codes)])
    positions = torch.cat([torch.full((n_logits,), n_pos - 1, device=device)] + [code.positions for code in codes])
    nodes = torch.cat([torch.arange(logit_offset, logit_offset + n_logits, device=device),
                       torch.arange(n_features, device=device)])
    sizes = [code.latents.shape[0] for code in codes]
    starts = [sum(sizes[:layer]) for layer in range(n_layers)]
    return _Targets(sites, positions, nodes, logit_vectors, [code.encoders for code in codes], starts)


def _feature_edges(output_gradients: list[torch.Tensor], layer: int, code: _LayerCode) -> torch.Tensor:
    """``[rows, n]``: each target's edge from each feature of `layer`, summed over
    the MLP outputs the feature writes to (layer, layer + 1, ... for a cross-layer
    transcoder) that lie below the targets' site (``output_gradients``
    ``[rows, n_pos, d]``, one per such layer), each output's gradient dotted with
    the scaled decoders of the features at that position only (a sampled
    dense-dense product, not a ``[rows, features, d]`` gather)."""
    edges = None
    for gradient, scaled_decoders in zip(output_gradients[layer:], code.scaled_decoders):
        size = gradient.shape[0]
        dots = torch.ops.interpkernels.gathered_dot(gradient.reshape(-1, gradient.shape[-1]),
                                                    code.slots.repeat(size, 1), scaled_decoders)
        dots = dots.view(size, -1)[:, code.position_slots]
        edges = dots if edges is None else edges.add_(dots)
    return edges


def _edges_into_block(block: torch.Tensor, gradients, codes: list[_LayerCode], feature_starts: list[int],
                      token_vectors: torch.Tensor) -> None:
    """Write the edges of one pass's targets into `block` ``[rows, sources]``
    (sources in node order: features, errors, tokens; zero-filled) from the
    gradients at the MLP outputs below the targets' site (``gradients[:-1]``)
    and at the token embeddings (``gradients[-1]``)."""
    n_features = sum(code.latents.shape[0] for code in codes)
    n_pos = token_vectors.shape[0]
    *output_gradients, embedding_gradient = [gradient[:, 0] for gradient in gradients]  # [rows, n_pos, d] each
    for layer, gradient in enumerate(output_gradients):
        code = codes[layer]
        start = feature_starts[layer]
        block[:, start:start + code.latents.shape[0]] = _feature_edges(output_gradients, layer, code)
        errors = n_features + layer * n_pos
        block[:, errors:errors + n_pos] = torch.einsum("bpd,pd->bp", gradient, code.errors)
    tokens = n_features + len(codes) * n_pos
    block[:, tokens:tokens + n_pos] = torch.einsum("bpd,pd->bp", embedding_gradient, token_vectors)


def mass_thresholds(magnitudes: torch.Tensor, share: float) -> torch.Tensor:
    """Per row of `magnitudes` ``[rows, n]`` (non-negative), the value t such
    that the entries ``>= t`` are the fewest largest ones whose sum reaches
    `share` of the row's sum: walking the row sorted descending, the entry at
    which the running sum (float64) first reaches ``share * total``. Found by
    selection: the top k of each row (``torch.topk``), k growing fourfold
    only for rows whose top k do not yet hold the share, not a sort of the row."""
    rows, n = magnitudes.shape
    thresholds = magnitudes.new_zeros(rows)
    if n == 0:
        return thresholds
    wanted = share * magnitudes.sum(1, dtype=torch.float64)
    pending = torch.arange(rows, device=magnitudes.device)
    k = min(n, 256)
    while pending.numel():
        top = torch.topk(magnitudes[pending], k, dim=1).values
        cumulative = top.cumsum(1, dtype=torch.float64)
        done = (cumulative[:, -1] >= wanted[pending]) | (k == n)
        index = torch.searchsorted(cumulative[done], wanted[pending][done, None]).clamp(max=k - 1)
        thresholds[pending[done]] = top[done].gather(1, index)[:, 0]
        pending = pending[~done]
        k = min(n, 4 * k)
    return thresholds


def _kept_edges(block: torch.Tensor, edge_mass: float) -> torch.Tensor:
    """Mask of the edges each row of `block` keeps: every non-zero edge at
    edge_mass 1, else its largest ones by |A| holding edge_mass of the row's
    absolute sum (ties with the smallest kept one kept too)."""
    if edge_mass >= 1.0:
        return block != 0
    magnitudes = block.abs()
    return (magnitudes >= mass_thresholds(magnitudes, edge_mass)[:, None]) & (magnitudes > 0)


# Edges per storage segment of the rows: 64 MiB a column or value array, so
# each is its own mapping (glibc maps allocations past 32 MiB apart) and goes
# back to the system when freed rather than fragmenting the heap.
_SEGMENT_EDGES = 2**24


@dataclass
class _Chunk:
    """The rows of one pass: which rows of the store, and where their edges sit."""

    rows: slice
    segment: int
    start: int  # first edge within the segment
    n_edges: int


class _RowStore:
    """The rows computed so far, in the order they were computed
    (circuit-tracer's: logits, then features), their edges row-major in
    preallocated segments: columns int32 (ascending within a row), values in
    the model's dtype. Every row's node and edge count sit in arrays
    allocated once, so nothing small and long-lived is allocated between a
    pass's temporaries (which would pin them in the heap)."""

    def __init__(self, n_rows: int) -> None:
        self.row_nodes = torch.empty(n_rows, dtype=torch.int64)  # node index before unselected features are dropped
        self.row_counts = torch.empty(n_rows, dtype=torch.int64)
        self.n_rows = 0
        self.chunks: list[_Chunk] = []
        self.segments: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self.used = 0  # edges filled in the last segment
        self.n_edges = 0

    def nodes(self, chunk: _Chunk) -> torch.Tensor:
        return self.row_nodes[chunk.rows]

    def counts(self, chunk: _Chunk) -> torch.Tensor:
        return self.row_counts[chunk.rows]

    def row_of_edge(self, chunk: _Chunk) -> torch.Tensor:
        """Each of the chunk's edges' row within the chunk."""
        counts = self.counts(chunk)
        return torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts)

    def add(self, nodes: torch.Tensor, block: torch.Tensor, edge_mass: float) -> None:
        kept = _kept_edges(block, edge_mass)
        rows = slice(self.n_rows, self.n_rows + nodes.shape[0])
        self.row_nodes[rows] = nodes
        torch.sum(kept, 1, out=self.row_counts[rows])
        n_edges = int(self.row_counts[rows].sum())
        if not self.segments or self.used + n_edges > self.segments[-1][0].shape[0]:
            size = max(_SEGMENT_EDGES, n_edges)
            self.segments.append((torch.empty(size, dtype=torch.int32, device=block.device),
                                  block.new_empty(size)))
            self.used = 0
        columns, values = self.segments[-1]
        # Boolean indexing walks row-major, as the rows are stored; no int64 index pairs.
        sources = torch.arange(block.shape[1], dtype=torch.int32, device=block.device)
        columns[self.used:self.used + n_edges] = sources.expand_as(block)[kept]
        values[self.used:self.used + n_edges] = block[kept]
        self.chunks.append(_Chunk(rows, len(self.segments) - 1, self.used, n_edges))
        self.n_rows = rows.stop
        self.used += n_edges
        self.n_edges += n_edges

    def edges(self, chunk: _Chunk) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's columns and values (views)."""
        columns, values = self.segments[chunk.segment]
        end = chunk.start + chunk.n_edges
        return columns[chunk.start:end], values[chunk.start:end]

    def partial_influence(self, logit_probabilities: torch.Tensor, n_nodes: int, max_iter: int = 128) -> torch.Tensor:
        """circuit-tracer's compute_partial_influences on the rows so far:
        ``p A + p A^2 + ...`` for the row-normalised |A| of the computed rows
        (row sums clamped at 1e-8), p the logit probabilities."""
        row_sums = []
        for chunk in self.chunks:
            _, values = self.edges(chunk)
            row_of_edge = self.row_of_edge(chunk)
            row_sums.append(values.new_zeros(chunk.rows.stop - chunk.rows.start).index_add_(0, row_of_edge,
                                                                                           values.abs()))

        def times_matrix(current: torch.Tensor) -> torch.Tensor:
            following = torch.zeros_like(current)
            for chunk, sums in zip(self.chunks, row_sums):
                weights = current[self.nodes(chunk)]
                if not weights.any():
                    continue
                columns, values = self.edges(chunk)
                row_of_edge = self.row_of_edge(chunk)
                shares = values.abs().div_(sums.clamp(min=1e-8)[row_of_edge])
                following.index_add_(0, columns, shares.mul_(weights[row_of_edge]))
            return following

        logit_weights = logit_probabilities.new_zeros(n_nodes)
        logit_weights[n_nodes - logit_probabilities.shape[0]:] = logit_probabilities
        return pruning.power_series(times_matrix, logit_weights, max_iter, "partial influence")

    def to_csr(self, column_of_node: torch.Tensor, row_of_node: torch.Tensor, n_rows: int) -> torch.Tensor:
        """The rows as a sparse CSR matrix ``[n_rows, n_rows]`` with int32
        indices: node i's row at ``row_of_node[i]``, its edge to node j in
        column ``column_of_node[j]``, edges to nodes mapped to -1 (features
        without a row) left out. Each segment is freed once placed, so the
        matrix and the store are not both held whole."""
        drops_columns = bool((column_of_node < 0).any())
        kept_counts = torch.zeros(n_rows, dtype=torch.int64)
        for chunk in self.chunks:
            if drops_columns:
                columns, _ = self.edges(chunk)
                row_of_edge = self.row_of_edge(chunk)
                kept_counts[row_of_node[self.nodes(chunk)]] = torch.zeros_like(self.counts(chunk)).index_add_(
                    0, row_of_edge, (column_of_node[columns] >= 0).long())
            else:
                kept_counts[row_of_node[self.nodes(chunk)]] = self.counts(chunk)
        row_starts = torch.cat([kept_counts.new_zeros(1), kept_counts.cumsum(0)])
        n_edges = int(row_starts[-1])
        if n_edges >= 2**31:
            raise ValueError(f"{n_edges:,} edges: past the int32 indices of the adjacency; lower max_feature_nodes "
                             "or edge_mass")
        out_columns = torch.empty(n_edges, dtype=torch.int32)
        out_values = torch.empty(n_edges, dtype=self.segments[0][1].dtype if self.segments else torch.float32)
        for index, chunk in enumerate(self.chunks):
            columns, values = self.edges(chunk)
            rows = row_of_node[self.nodes(chunk)]
            start = int(row_starts[rows[0]]) if rows.shape[0] else 0
            if not drops_columns and bool((rows.diff() == 1).all()):
                # Consecutive rows, every edge kept: one copy.
                out_columns[start:start + columns.shape[0]] = columns
                out_values[start:start + columns.shape[0]] = values
            else:
                mapped = column_of_node[columns]
                kept = mapped >= 0
                row_of_edge = self.row_of_edge(chunk)
                # An edge's rank among its row's kept edges (mapped columns stay ascending, as the columns are).
                kept_before = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(kept, 0)])
                counts = self.counts(chunk)
                rank = kept_before[:-1] - kept_before[torch.cumsum(counts, 0) - counts][row_of_edge]
                destination = (row_starts[rows][row_of_edge] + rank)[kept]
                out_columns[destination] = mapped[kept]
                out_values[destination] = values[kept]
            if index + 1 == len(self.chunks) or self.chunks[index + 1].segment != chunk.segment:
                self.segments[chunk.segment] = None
        with warnings.catch_warnings():  # "CSR support is in beta": the layout is used for storage only
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(row_starts.to(torch.int32), out_columns, out_values, (n_rows, n_rows),
                                           check_invariants=True)


# Bytes a vector-Jacobian pass may take: it runs as many rows at once as fit
# (at least one), whatever batch_size says; batch_size only paces the schedule.
_PASS_MEMORY_BYTES = 512 * 2**20


def _rows_per_pass(n_sources: int, n_pos: int, d_model: int, n_sites: int, itemsize: int) -> int:
    """Rows one pass holds within _PASS_MEMORY_BYTES: per row, its seed and
    gradients at each site and the backward's temporaries (about eight
    ``[n_pos, d_model]`` tensors per site, measured on the benchmark's
    model), and its dense edge row with its mask and magnitudes."""
    per_row = (8 * n_sites * n_pos * d_model + 3 * n_sources) * itemsize
    return max(1, _PASS_MEMORY_BYTES // per_row)


def _feature_schedule(store: _RowStore, logit_probabilities: torch.Tensor, n_features: int,
                      max_feature_nodes: int, batch_size: int, update_interval: int, n_nodes: int):
    """circuit-tracer's order of feature rows (attribute.py, phase 4): every
    feature in node order when all are wanted; else, every
    ``update_interval * batch_size`` rows, the features not yet visited ranked
    by their partial influence (:meth:`_RowStore.partial_influence`) on the
    rows computed so far. Yields batches of feature indices, batch_size at most."""
    visited = torch.zeros(n_features, dtype=torch.bool)
    n_visited = 0
    while n_visited < max_feature_nodes:
        if max_feature_nodes == n_features:
            pending = torch.arange(n_features)
        else:
            influences = store.partial_influence(logit_probabilities, n_nodes)
            ranked = torch.argsort(influences[:n_features], descending=True).cpu()
            pending = ranked[~visited[ranked]][:min(update_interval * batch_size, max_feature_nodes - n_visited)]
        for start in range(0, pending.shape[0], batch_size):
            batch = pending[start:start + batch_size]
            n_visited += batch.shape[0]
            visited[batch] = True
            yield batch


def attribution_graph(model, transcoders: Transcoders, tokens: torch.Tensor, *,
                      max_n_logits: int = 10, desired_logit_prob: float = 0.95, max_feature_nodes: int | None = None,
                      batch_size: int = 64, update_interval: int = 4, edge_mass: float = 1.0,
                      progress: bool = True) -> AttributionGraph:
    """The attribution graph of `tokens` (1-D, BOS first) on a TransformerLens
    ``HookedTransformer`` (tested: GPT-2 style, LayerNorm and learned
    positions; Llama style, RMSNorm, rotary and gated MLP) with one
    per-layer transcoder per layer (JumpReLU, ReLU or top-k, with or without a
    skip connection), or one cross-layer transcoder (a
    ``CrossLayerTranscoder`` or ``JumpReLUCrossLayerTranscoder``, as is or in a
    ``HookedCrossLayerTranscoder``), reading the MLP's
    input and writing its output; equal to circuit-tracer 0.5.0's
    ``attribute(tokens, ReplacementModel(model, transcoders),
    max_n_logits=..., desired_logit_prob=..., batch_size=...,
    max_feature_nodes=..., update_interval=...)``.

    max_feature_nodes: rows computed for at most this many features (all when
    None), chosen as circuit-tracer chooses them: the logit rows first, then
    batches of batch_size features ranked by their influence on the rows so
    far, re-ranked every update_interval batches. selected_features: the
    features whose rows were computed (ascending); they alone are feature
    nodes of the adjacency. batch_size paces that schedule; each
    vector-Jacobian pass runs as many rows as fit a fixed memory budget.

    edge_mass: per row, keep the largest edges by |A| holding this share of
    the row's absolute sum (1: every edge, the exact graph), pruned as each
    row is computed, by selection rather than a sort of the row.

    progress: the rows done, on stderr (interpkernels._progress.Progress;
    False: silent).

    A transcoder's code is used as it encodes: give JumpReLU transcoders
    ``k = num_latents`` (load_transcoders' default) to keep every active latent.
    A top-k code here is the k largest of ``relu(pre)``; circuit-tracer's
    keeps negative pre-activations among the k largest (see load_transcoders).
    """
    n_layers = model.cfg.n_layers
    checked = _check_transcoders(transcoders, n_layers)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens: expected a 1-D int64 or int32 tensor, got {tokens!r:.80}")
    for name, value in (("batch_size", batch_size), ("update_interval", update_interval)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if max_feature_nodes is not None and (not isinstance(max_feature_nodes, int) or max_feature_nodes < 1):
        raise ValueError(f"max_feature_nodes: expected None or an int >= 1, got {max_feature_nodes!r}")
    if not 0.0 < edge_mass <= 1.0:
        raise ValueError(f"edge_mass: expected a share in (0, 1], got {edge_mass!r}")
    n_pos = tokens.shape[0]

    final_logits, mlp_inputs, mlp_outputs, embedding, unembedding_input = _frozen_forward(
        model, tokens, _skip_weights(checked))
    codes = _codes(checked, [x[0].detach() for x in mlp_inputs], [y[0].detach() for y in mlp_outputs])
    logit_tokens, logit_probabilities, logit_vectors = _salient_logits(
        final_logits, model.W_U, max_n_logits, desired_logit_prob)
    logit_probabilities = logit_probabilities.detach()
    targets = _targets(codes, logit_vectors, n_pos)

    n_features = sum(code.latents.shape[0] for code in codes)
    n_logits = logit_tokens.shape[0]
    logit_offset = n_features + (n_layers + 1) * n_pos
    n_selected = n_features if max_feature_nodes is None else min(max_feature_nodes, n_features)
    sites = [*mlp_inputs, unembedding_input]
    leaves = [*mlp_outputs, embedding]
    token_vectors = embedding[0].detach()
    pass_rows = _rows_per_pass(logit_offset, n_pos, model.cfg.d_model, n_layers + 1, final_logits.element_size())
    store = _RowStore(n_logits + n_selected)

    def compute_rows(batch: torch.Tensor) -> None:
        """The rows of targets `batch`, one pass per site and at most pass_rows rows, into the store."""
        batch_sites = targets.sites[batch]
        for site in batch_sites.unique().tolist():
            of_site = batch[batch_sites == site]
            for start in range(0, of_site.shape[0], pass_rows):
                members = of_site[start:start + pass_rows]
                seed = sites[site].new_zeros(members.shape[0], *sites[site].shape)
                seed[torch.arange(members.shape[0]), 0, targets.positions[members]] = targets.vectors(members)
                # A site reads only the MLP outputs below it and the embeddings.
                gradients = torch.autograd.grad(sites[site], leaves[:site] + leaves[-1:], seed, retain_graph=True,
                                                is_grads_batched=True)
                block = final_logits.new_zeros(members.shape[0], logit_offset)
                _edges_into_block(block, gradients, codes, targets.feature_starts, token_vectors)
                del gradients, seed
                store.add(targets.nodes[members], block, edge_mass)

    bar = Progress(n_logits + n_selected, "row", progress)

    def advance(rows: int) -> None:
        bar.advance(rows)
        if bar.due():
            bar.show(f"attributed {bar.done:,} of {bar.total:,} rows", f"{store.n_edges:,} edges")

    try:
        for start in range(0, n_logits, batch_size):
            batch = torch.arange(start, min(start + batch_size, n_logits))
            compute_rows(batch)
            advance(batch.shape[0])
        for features in _feature_schedule(store, logit_probabilities, n_features, n_selected, batch_size,
                                          update_interval, logit_offset + n_logits):
            compute_rows(n_logits + features)
            advance(features.shape[0])
    finally:
        bar.close()

    # Logit rows' nodes come after every feature's, so the first n_selected are the features.
    selected_features = store.row_nodes.sort().values[:n_selected].cpu()
    adjacency = store.to_csr(*_node_maps(selected_features, n_features, logit_offset, n_logits),
                             n_selected + (n_layers + 1) * n_pos + n_logits)
    active_features = torch.cat([torch.stack([torch.full_like(code.positions, layer), code.positions, code.latents], 1)
                                 for layer, code in enumerate(codes)])
    return AttributionGraph(tokens, n_layers, active_features, torch.cat([code.values for code in codes]),
                            selected_features, logit_tokens, logit_probabilities, adjacency)


def _node_maps(selected_features: torch.Tensor, n_features: int, logit_offset: int, n_logits: int):
    """Where each node of the computation (every active feature, errors,
    tokens, logits) sits in the graph, whose feature nodes are the selected
    features only (circuit-tracer's column read): as a column (-1: left out)
    and as a row."""
    n_nodes = logit_offset + n_logits
    position = torch.full((n_nodes,), -1, dtype=torch.int64)
    position[selected_features] = torch.arange(selected_features.shape[0])
    position[n_features:] = torch.arange(n_nodes - n_features) + selected_features.shape[0]
    return position.to(torch.int32), position
