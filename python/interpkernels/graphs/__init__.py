"""Attribution graphs (circuit tracing) on interpkernels' transcoders.

So far: circuit-tracer's on-disk transcoder format, read and written
(:func:`load_transcoders`, :func:`save_transcoders`), so transcoders move
between circuit-tracer and interpkernels unchanged.
"""

from interpkernels.graphs.transcoders import TranscoderSet, load_transcoders, save_transcoders

__all__ = ["TranscoderSet", "load_transcoders", "save_transcoders"]
