"""circuit-tracer's ``attribute()`` on interpkernels' graph engine, for its users.

    from interpkernels.integrations.circuit_tracer import attribute

    graph = attribute(prompt, replacement_model, max_n_logits=10, desired_logit_prob=0.95, batch_size=64)

takes what ``circuit_tracer.attribute`` takes (circuit-tracer 0.5.0,
``circuit_tracer/attribution/attribute.py``) and returns their ``Graph``,
computed by :func:`interpkernels.graphs.attribution_graph`: the prompt
tokenized by the model's own ``ensure_tokenized`` (a special token put first
when the prompt does not start with one), the model's per-layer transcoders
taken as interpkernels transcoders over the same tensors
(:func:`interpkernels.graphs.transcoders.transcoder_from_tensors`; a lazily
loaded encoder or decoder is read from its file once, as their own code reads
it), the ``ReplacementModel`` itself run as the ``HookedTransformer`` it is.

``max_feature_nodes`` and ``update_interval`` pass on to the engine, which
schedules the rows as theirs does. Options the engine does not have raise
``NotImplementedError`` naming themselves: ``attribution_targets`` other than
None (the salient logits) and ``offload``; so do their nnsight backend,
cross-layer transcoders, TopK or other activation functions than ReLU and
JumpReLU, and Gemma-3-it's four zeroed positions. ``verbose`` shows the
engine's progress instead of their log lines.

circuit-tracer is imported when ``attribute`` runs, not with this module. It
pins transformers and transformer-lens older than interpkernels' peers, so it
usually lives in an environment of its own
(``setup_helpers/circuit-tracer-env.sh``), where interpkernels is linked in:
there both import.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Literal

import torch

from interpkernels.graphs import TranscoderSet, attribution_graph
from interpkernels.graphs.transcoders import THRESHOLD_KEY, transcoder_from_tensors

__all__ = ["attribute"]

# The keywords the engine takes, so that an option it gains (max_feature_nodes, ...)
# passes through without a change here.
_ENGINE_OPTIONS = inspect.signature(attribution_graph).parameters


def _pass_on(options: dict, name: str, value) -> None:
    """Pass an option other than circuit-tracer's default on to the engine, if it takes it."""
    if name not in _ENGINE_OPTIONS:
        raise NotImplementedError(f"{name}: interpkernels.graphs.attribution_graph does not take it yet; "
                                  "leave it at circuit-tracer's default")
    options[name] = value


def _per_layer_transcoders(model) -> TranscoderSet:
    """The model's transcoders as interpkernels JumpReLU transcoders over the same tensors."""
    import torch.nn.functional as F
    from circuit_tracer.transcoder import TranscoderSet as TheirTranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    theirs = model.transcoders
    if not isinstance(theirs, TheirTranscoderSet):
        raise NotImplementedError(f"model.transcoders: a {type(theirs).__name__}; only per-layer "
                                  "transcoders (their TranscoderSet) are taken yet")
    ours = []
    for layer, transcoder in enumerate(theirs):
        activation = transcoder.activation_function
        if not (isinstance(activation, JumpReLU) or activation is F.relu):
            raise NotImplementedError(f"model.transcoders[{layer}]: activation function "
                                      f"{activation!r}; only JumpReLU and ReLU are taken yet")
        # getattr reads a lazy encoder or decoder from its file, as their own code does.
        tensors = {name: getattr(transcoder, name).detach() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        if transcoder.W_skip is not None:
            tensors["W_skip"] = transcoder.W_skip.detach()
        if isinstance(activation, JumpReLU):
            tensors[THRESHOLD_KEY] = activation.threshold.detach()
        ours.append(transcoder_from_tensors(tensors, where=f"model.transcoders[{layer}]"))
    return TranscoderSet(ours, theirs.feature_input_hook, theirs.feature_output_hook, theirs.scan)


def attribute(prompt: str | torch.Tensor | list[int], model, *,
              attribution_targets: Sequence | torch.Tensor | None = None, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, batch_size: int = 512, max_feature_nodes: int | None = None,
              offload: Literal["cpu", "disk", None] = None, verbose: bool = False, update_interval: int = 4):
    """``circuit_tracer.attribute(prompt, model, ...)`` computed by
    :func:`interpkernels.graphs.attribution_graph`; returns their ``Graph``.
    `model`: their ``ReplacementModel`` with the TransformerLens backend."""
    options = dict(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                   progress=verbose)
    for name, value in (("attribution_targets", attribution_targets), ("max_feature_nodes", max_feature_nodes),
                        ("offload", offload)):
        if value is not None:
            _pass_on(options, name, value)
    # update_interval only orders the rows max_feature_nodes leaves out.
    if max_feature_nodes is not None and update_interval != 4:
        _pass_on(options, "update_interval", update_interval)

    if getattr(model, "backend", None) != "transformerlens":
        raise NotImplementedError(f"model: backend {getattr(model, 'backend', None)!r}; only circuit-tracer's "
                                  "TransformerLens ReplacementModel is taken yet")
    if model.zero_positions != slice(0, 1):
        raise NotImplementedError(f"model: zeroes positions {model.zero_positions} (Gemma-3-it); the engine "
                                  "zeroes the first position only")
    tokens = model.ensure_tokenized(prompt)
    graph = attribution_graph(model, _per_layer_transcoders(model), tokens, **options)
    return graph.to_circuit_tracer(model, scan=model.scan)
