"""Benchmarks of every op against its reference and the peers' formulations.

`python -m interpkernels bench` runs them all and prints the table; each op
module (`python -m interpkernels.benchmarks.<op>`) defines its cases.
"""

from interpkernels.benchmarks import (
    component_attribution,
    jumprelu_encode,
    sae_training_step,
    sparse_decode,
    topk_encode,
)

OPS = {"topk_encode": topk_encode, "jumprelu_encode": jumprelu_encode, "sparse_decode": sparse_decode,
       "sae_training_step": sae_training_step,
       # ---- parameter decomposition ----
       "component_attribution": component_attribution}
