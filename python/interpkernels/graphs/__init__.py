"""Attribution graphs (circuit tracing) on interpkernels' transcoders.

- circuit-tracer's on-disk transcoder format, read and written
  (:func:`load_transcoders`, :func:`save_transcoders`), so transcoders move
  between circuit-tracer and interpkernels unchanged;
- :func:`attribution_graph`: circuit-tracer's unpruned graph of a prompt on a
  TransformerLens model (GPT-2 or Llama style) with per-layer transcoders.
"""

from interpkernels.graphs.attribution import AttributionGraph, attribution_graph
from interpkernels.graphs.transcoders import TranscoderSet, load_transcoders, save_transcoders

__all__ = ["AttributionGraph", "TranscoderSet", "attribution_graph", "load_transcoders", "save_transcoders"]
