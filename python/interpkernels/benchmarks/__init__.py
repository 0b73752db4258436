"""Benchmarks of every op against its reference and the peers' formulations.

`python -m interpkernels bench` runs them all and prints the table; each op
module (`python -m interpkernels.benchmarks.<op>`) defines its cases.
Attribution graphs, whole pipelines compared with circuit-tracer in fresh
subprocesses, have their own entry: `python -m interpkernels.benchmarks.graphs`.
"""

from interpkernels.benchmarks import (
    component_attribution,
    error_attribution,
    feature_edges,
    jumprelu_encode,
    latent_attribution,
    masked_component_forward,
    sae_training_step,
    sparse_decode,
    topk_encode,
)

OPS = {
    "topk_encode": topk_encode,
    "jumprelu_encode": jumprelu_encode,
    "sparse_decode": sparse_decode,
    "sae_training_step": sae_training_step,
    # attribution patching
    "latent_attribution": latent_attribution,
    "error_attribution": error_attribution,
    "feature_edges": feature_edges,
    # parameter decomposition
    "component_attribution": component_attribution,
    "masked_component_forward": masked_component_forward,
}
