"""Parameter decomposition (APD, SPD) on interpkernels' ops: components of linear
layers, attributions, top-k and masked forwards, losses and a training loop."""

from interpkernels.decomposition.components import LinearComponents
from interpkernels.decomposition.jacobian import output_jacobian_rows
from interpkernels.decomposition.losses import (
    component_schatten_norms,
    faithfulness_loss,
    reconstruction_loss,
    schatten_simplicity,
    stochastic_masks,
)
from interpkernels.decomposition.selection import batch_topk_components, component_forward, topk_components
from interpkernels.decomposition.train import APDConfig, APDHistory, apd_attributions, apd_losses, train_apd

__all__ = [
    "APDConfig",
    "APDHistory",
    "LinearComponents",
    "apd_attributions",
    "apd_losses",
    "batch_topk_components",
    "component_forward",
    "component_schatten_norms",
    "faithfulness_loss",
    "output_jacobian_rows",
    "reconstruction_loss",
    "schatten_simplicity",
    "stochastic_masks",
    "topk_components",
    "train_apd",
]
