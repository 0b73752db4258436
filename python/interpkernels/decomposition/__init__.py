"""Parameter decomposition (APD, SPD) on interpkernels' ops: components of linear
layers, attributions, top-k and masked forwards, losses and the APD and SPD training loops."""

from interpkernels.decomposition.components import LinearComponents, TransposedLinearComponents
from interpkernels.decomposition.jacobian import output_jacobian_rows
from interpkernels.decomposition.losses import (
    component_schatten_norms,
    faithfulness_loss,
    importance_minimality,
    reconstruction_loss,
    schatten_simplicity,
    stochastic_masks,
)
from interpkernels.decomposition.selection import batch_topk_components, component_forward, topk_components
from interpkernels.decomposition.spd import (
    CausalImportance,
    SPDConfig,
    SPDHistory,
    causal_importances,
    mask_importance,
    minimality_importance,
    spd_losses,
    train_spd,
)
from interpkernels.decomposition.train import APDConfig, APDHistory, apd_attributions, apd_losses, train_apd

__all__ = [
    "APDConfig",
    "APDHistory",
    "CausalImportance",
    "SPDConfig",
    "SPDHistory",
    "TransposedLinearComponents",
    "causal_importances",
    "importance_minimality",
    "mask_importance",
    "minimality_importance",
    "spd_losses",
    "train_spd",
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
