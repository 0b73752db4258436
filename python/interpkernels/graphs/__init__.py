"""Attribution graphs (circuit tracing) on interpkernels' transcoders.

- circuit-tracer's on-disk transcoder formats (per-layer sets and
  cross-layer transcoders), read and written
  (:func:`load_transcoders`, :func:`save_transcoders`), so transcoders move
  between circuit-tracer and interpkernels unchanged;
- :func:`attribution_graph`: circuit-tracer's graph of a prompt (unpruned;
  ``.prune()`` and ``.scores()`` as theirs) on a
  TransformerLens model (GPT-2 or Llama style) with per-layer transcoders
  (JumpReLU, ReLU or top-k, optional skip) or a cross-layer transcoder,
  every feature's row or circuit-tracer's ``max_feature_nodes`` selection,
  each row exact or cut to ``edge_mass`` of its weight, in a sparse CSR
  adjacency;
- its files for circuit-tracer (:mod:`interpkernels.graphs.export`): their
  frontend's JSON (``AttributionGraph.save_json``) and their ``Graph.to_pt``
  file (``AttributionGraph.to_circuit_tracer_file``); their ``Graph`` object
  where circuit-tracer imports (``AttributionGraph.to_circuit_tracer``).

circuit-tracer's own ``attribute()`` on this engine, for its users:
:mod:`interpkernels.integrations.circuit_tracer`.
"""

from interpkernels.graphs.attribution import AttributionGraph, attribution_graph
from interpkernels.graphs.pruning import PrunedGraph
from interpkernels.graphs.transcoders import (HookedCrossLayerTranscoder, TranscoderSet, load_transcoders,
                                              save_transcoders)

__all__ = ["AttributionGraph", "HookedCrossLayerTranscoder", "PrunedGraph", "TranscoderSet", "attribution_graph",
           "load_transcoders", "save_transcoders"]
