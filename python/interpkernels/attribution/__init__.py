"""Attribution patching (AtP, integrated gradients, edges) on the latents of
sparse coders that sit in any nn.Module; see :mod:`.attribute`."""

from interpkernels.attribution.attribute import AttributionResult, NodeScores, attribute
from interpkernels.attribution.edges import Edges

__all__ = ["AttributionResult", "Edges", "NodeScores", "attribute"]
