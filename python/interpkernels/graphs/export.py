"""An attribution graph in circuit-tracer 0.5.0's files, its frontend's JSON
and its ``Graph.to_pt`` file, and as its ``Graph`` object where circuit-tracer
imports (:func:`circuit_tracer_graph`).

The JSON is what ``circuit_tracer.utils.create_graph_files`` writes (the
pydantic models of ``circuit_tracer/frontend/graph_models.py``: ``metadata``,
``qParams``, ``nodes``, ``links``), field for field and in the same order, so
their local server and Neuronpedia's viewer open it.

The ``.pt`` file is what ``Graph.to_pt`` writes and ``Graph.from_pt`` reads: a
pickled dict of their ``Graph``'s constructor arguments. Their ``Graph`` itself
cannot be built where circuit-tracer does not import (it pins transformers and
transformer-lens versions older than the peers', so it is usually installed
apart), and a pickle of their classes needs them importable; the file holds plain types
only, which their ``Graph.__init__`` converts back: ``logit_targets`` as a
tensor of token ids (``from_pt``'s legacy form: ``LogitTarget(token_str="",
vocab_idx)``, the token strings do not survive) and ``cfg`` as an object whose
``to_dict()`` gives the fields their ``UnifiedConfig`` reads.
"""

from __future__ import annotations

import functools
import json
import os
import types

import torch

def _cantor_pairing(x: int, y: int) -> int:
    """graph_models._cantor_pairing: a feature node's ``feature`` number, unique across layers."""
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_node_id: str, *,
          token_prob: float = 0.0, is_target_logit: bool = False, clerp: str = "",
          influence: float | None = None, activation: float | None = None) -> dict:
    """graph_models.Node's fields, in its order, with its defaults."""
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx,
            "feature_type": feature_type, "token_prob": token_prob, "is_target_logit": is_target_logit,
            "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_node_id, "clerp": clerp,
            "influence": influence, "activation": activation}


def _nodes(graph, node_mask: torch.Tensor, cumulative_scores: torch.Tensor, tokenizer) -> dict[int, dict]:
    """create_graph_files' create_nodes: every kept node by its index."""
    n_features, n_pos, n_layers = graph.n_features, graph.tokens.shape[0], graph.n_layers
    error_end = n_features + n_layers * n_pos
    token_end = error_end + n_pos
    influence = cumulative_scores.tolist()
    nodes = {}
    for index in node_mask.nonzero().flatten().tolist():
        if index < n_features:
            layer, position, latent = graph.active_features[graph.selected_features[index]].tolist()
            nodes[index] = _node(f"{layer}_{latent}_{position}", _cantor_pairing(layer, latent), str(layer), position,
                                 "cross layer transcoder", f"{layer}_{latent}-0", influence=influence[index],
                                 activation=graph.activation_values[graph.selected_features[index]].item())
        elif index < error_end:
            layer, position = divmod(index - n_features, n_pos)
            nodes[index] = _node(f"0_{layer}_{position}", -1, str(layer), position, "mlp reconstruction error",
                                 f"{layer}_{position}-0", influence=influence[index])
        elif index < token_end:
            position = index - error_end
            token = int(graph.tokens[position])
            nodes[index] = _node(f"E_{token}_{position}", position, "E", position, "embedding",
                                 f"E_{token}-{position}", influence=influence[index])
        else:
            rank = index - token_end
            token, probability = int(graph.logit_tokens[rank]), graph.logit_probabilities[rank].item()
            layer = str(n_layers + 1)
            # Logit nodes carry no influence in theirs (Node.logit_node takes none).
            nodes[index] = _node(f"{layer}_{token}_{n_pos - 1}", token, layer, n_pos - 1, "logit",
                                 f"L_{token}-{n_pos - 1}", token_prob=probability, is_target_logit=rank == 0,
                                 clerp=f'Output "{tokenizer.decode(token)}" (p={probability:.3f})')
    return nodes


def frontend_graph(graph, tokenizer, *, slug: str, scan: str, node_threshold: float = 0.8,
                   edge_threshold: float = 0.98) -> dict:
    """The frontend's graph of `graph` pruned at these thresholds, as
    create_graph_files builds it: the kept nodes, the kept edges between them
    (rows of the adjacency in order, then columns), and of the nodes only those
    with an edge, plus every token and logit."""
    if not isinstance(scan, str) or not scan:
        raise ValueError(f"scan: expected the transcoders' name (a non-empty string), got {scan!r}")
    if not isinstance(slug, str) or not slug:
        raise ValueError(f"slug: expected a non-empty string, got {slug!r}")
    pruned = graph.prune(node_threshold, edge_threshold)
    nodes = _nodes(graph, pruned.node_mask, pruned.cumulative_scores, tokenizer)
    targets, sources = pruned.edges.indices().tolist()  # coalesced: row-major, as their mask's nonzero()
    links = [{"source": nodes[source]["node_id"], "target": nodes[target]["node_id"], "weight": weight}
             for target, source, weight in zip(targets, sources, pruned.edges.values().tolist())
             if source in nodes and target in nodes]
    connected = {link["source"] for link in links} | {link["target"] for link in links}
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [],
                "prompt_tokens": [tokenizer.decode(token) for token in graph.tokens.tolist()],
                "prompt": tokenizer.decode(graph.tokens.tolist()), "node_threshold": node_threshold,
                "schema_version": 1}
    return {"metadata": metadata,
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": [node for node in nodes.values()
                      if node["node_id"] in connected or node["feature_type"] in ("embedding", "logit")],
            "links": links}


def save_json(graph, path: str | os.PathLike, tokenizer, *, scan: str, slug: str | None = None,
              node_threshold: float = 0.8, edge_threshold: float = 0.98) -> None:
    """Write :func:`frontend_graph` to `path` (slug: the file's stem unless
    given) and list it in ``graph-metadata.json`` beside it, as
    create_graph_files does for their server's index."""
    path = os.fspath(path)
    slug = slug if slug is not None else os.path.splitext(os.path.basename(path))[0]
    document = frontend_graph(graph, tokenizer, slug=slug, scan=scan, node_threshold=node_threshold,
                              edge_threshold=edge_threshold)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, ensure_ascii=False)
    index_path = os.path.join(os.path.dirname(os.path.abspath(path)), "graph-metadata.json")
    index = {"graphs": []}
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    index["graphs"] = [entry for entry in index["graphs"] if entry["slug"] != slug] + [document["metadata"]]
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2, ensure_ascii=False)


# The fields of a TransformerLens config that circuit-tracer's UnifiedConfig keeps.
_UNIFIED_CONFIG_FIELDS = ("n_layers", "d_model", "d_head", "n_heads", "d_mlp", "d_vocab", "tokenizer_name",
                          "model_name", "original_architecture", "n_key_value_heads", "dtype")


def _tokenizer(model, tokenizer):
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("tokenizer: the model has none; pass the tokenizer that decodes the prompt")
    return tokenizer


def _graph_arguments(graph, model, tokenizer, scan) -> dict:
    """Their ``Graph``'s constructor arguments for this graph, as their
    ``attribute()`` passes them (its dense adjacency included), of builtin
    types and tensors only: ``logit_targets`` as the token ids, ``cfg`` as an
    object whose ``to_dict()`` gives the fields their ``UnifiedConfig`` reads."""
    config = {name: getattr(model.cfg, name, None) for name in _UNIFIED_CONFIG_FIELDS}
    return {
        "input_string": tokenizer.decode(graph.tokens.tolist()),
        "adjacency_matrix": graph.adjacency.to_dense(),
        # An object with UnifiedConfig's to_dict(), of builtin types only, so it unpickles without interpkernels.
        "cfg": types.SimpleNamespace(to_dict=functools.partial(dict, config)),
        "active_features": graph.active_features,
        "logit_targets": graph.logit_tokens,
        "logit_probabilities": graph.logit_probabilities,
        # Their attribute() takes the tokenizer's (AttributionTargets.vocab_size), not the model's d_vocab.
        "vocab_size": tokenizer.vocab_size,
        "input_tokens": graph.tokens,
        "selected_features": graph.selected_features,
        "activation_values": graph.activation_values,
        "scan": scan,
    }


def save_circuit_tracer_graph(graph, path: str | os.PathLike, model, tokenizer=None, *,
                              scan: str | list[str] | None = None) -> None:
    """Write what circuit-tracer's ``Graph.to_pt`` writes for this graph (its
    dense adjacency included); ``Graph.from_pt(path)`` opens it. `model`: the
    HookedTransformer the graph was computed on (its config);
    `tokenizer` (default ``model.tokenizer``) decodes the prompt."""
    torch.save(_graph_arguments(graph, model, _tokenizer(model, tokenizer), scan), os.fspath(path))


def circuit_tracer_graph(graph, model, tokenizer=None, *, scan: str | list[str] | None = None):
    """circuit-tracer's ``Graph`` of this graph, as their ``attribute()`` builds
    it: their ``LogitTarget`` (token string, id) per logit. Needs circuit-tracer
    importable (in its own environment, where interpkernels is linked in:
    setup_helpers/circuit-tracer-env.sh); elsewhere :func:`save_circuit_tracer_graph`
    writes the file their ``Graph.from_pt`` opens. Arguments as there."""
    try:
        from circuit_tracer.attribution.targets import LogitTarget
        from circuit_tracer.graph import Graph
    except ImportError as error:
        raise ImportError("to_circuit_tracer needs circuit-tracer importable (it pins transformers and "
                          "transformer-lens older than interpkernels' peers, so it usually lives in its own "
                          "environment: setup_helpers/circuit-tracer-env.sh); elsewhere "
                          "to_circuit_tracer_file writes the .pt its Graph.from_pt opens") from error
    tokenizer = _tokenizer(model, tokenizer)
    arguments = _graph_arguments(graph, model, tokenizer, scan)
    arguments["logit_targets"] = [LogitTarget(token_str=tokenizer.decode(token), vocab_idx=token)
                                  for token in graph.logit_tokens.tolist()]
    return Graph(**arguments)
