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

    hooks = [(name, freeze) for name in model.hook_dict
             if name.endswith(("attn.hook_pattern", "hook_scale"))]
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


def _feature_edges(gradients: list[torch.Tensor | None], layer: int, code: _LayerCode) -> torch.Tensor:
    """``[batch, n]``: each target's edge from each feature of `layer`, summed over
    the MLP outputs the feature writes to (layer, layer + 1, ... for a cross-layer
    transcoder), each output's gradient ``[batch, n_pos, d]`` dotted with the
    scaled decoders of the features at that position only (a sampled dense-dense
    product, not a [batch, features, d] gather)."""
    edges = None
    for offset, scaled_decoders in enumerate(code.scaled_decoders):
        gradient = gradients[layer + offset]
        if gradient is None:  # no target of the batch reads past this output
            continue
        size = gradient.shape[0]
        dots = torch.ops.interpkernels.gathered_dot(gradient.reshape(-1, gradient.shape[-1]),
                                                    code.slots.repeat(size, 1), scaled_decoders)
        dots = dots.view(size, -1)[:, code.position_slots]
        edges = dots if edges is None else edges + dots
    return edges


def _edges_of_batch(gradients, codes: list[_LayerCode], token_vectors: torch.Tensor):
    """Dense edges ``[batch, sources reached]`` of one batch of targets from the
    gradients at every MLP output and at the token embeddings, and the mask of
    the sources they reach within :func:`_source_columns` (a layer no target
    of the batch reads past has no gradient)."""
    # [batch, n_pos, d] per MLP output (None where unreached), then the embeddings.
    gradients = [None if gradient is None else gradient[:, 0] for gradient in gradients]
    edges, reached = [], []
    for layer, code in enumerate(codes):
        n_sources = code.latents.shape[0] + code.errors.shape[0]
        reached.append(torch.full((n_sources,), gradients[layer] is not None, device=token_vectors.device))
        if gradients[layer] is not None:
            edges.append(_feature_edges(gradients, layer, code))
            edges.append(torch.einsum("bpd,pd->bp", gradients[layer], code.errors))
    # Every target reads past the embedding.
    edges.append(torch.einsum("bpd,pd->bp", gradients[-1], token_vectors))
    reached.append(torch.ones(token_vectors.shape[0], dtype=torch.bool, device=token_vectors.device))
    return torch.cat(edges, dim=1), torch.cat(reached)


def attribution_graph(model, transcoders: Transcoders, tokens: torch.Tensor, *,
                      max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                      batch_size: int = 64, progress: bool = True) -> AttributionGraph:
    """The attribution graph of `tokens` (1-D, BOS first) on a TransformerLens
    ``HookedTransformer`` (tested: GPT-2 style, LayerNorm and learned
    positions; Llama style, RMSNorm, rotary and gated MLP) with one
    per-layer transcoder per layer (JumpReLU, ReLU or top-k, with or without a
    skip connection), or one cross-layer transcoder (a
    ``CrossLayerTranscoder`` or ``JumpReLUCrossLayerTranscoder``, as is or in a
    ``HookedCrossLayerTranscoder``), reading the MLP's
    input and writing its output; equal to circuit-tracer 0.5.0's
    ``attribute(tokens, ReplacementModel(model, transcoders),
    max_n_logits=..., desired_logit_prob=...)`` with every feature's row
    computed (its max_feature_nodes=None). batch_size: target rows per
    vector-Jacobian product. progress: the rows done, on stderr
    (interpkernels._progress.Progress; False: silent).

    A transcoder's code is used as it encodes: give JumpReLU transcoders
    ``k = num_latents`` (load_transcoders' default) to keep every active latent.
    A top-k code here is the k largest of ``relu(pre)``; circuit-tracer's
    keeps negative pre-activations among the k largest (see load_transcoders).
    """
    n_layers = model.cfg.n_layers
    checked = _check_transcoders(transcoders, n_layers)
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1 or tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens: expected a 1-D int64 or int32 tensor, got {tokens!r:.80}")
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    n_pos = tokens.shape[0]

    final_logits, mlp_inputs, mlp_outputs, embedding, unembedding_input = _frozen_forward(
        model, tokens, _skip_weights(checked))
    codes = _codes(checked, [x[0].detach() for x in mlp_inputs], [y[0].detach() for y in mlp_outputs])
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
