"""Drop-in adapters that run popular SAE libraries on interpkernels' fused ops,
and circuit-tracer's ``attribute()`` on interpkernels' graph engine
(:mod:`interpkernels.integrations.circuit_tracer`, its own docstring).

One module per library, each in Liger-Kernel's ``apply_*`` style:

    from interpkernels.integrations import sparsify, saelens, dictionary_learning

    sae = sparsify.accelerate(sae)            # patch one instance (returned for chaining)
    sparsify.apply_to_sparsify()              # patch the library's classes: every instance
    sparsify.revert(sae)                      # this instance runs the library's code again
    sparsify.revert_sparsify()                # take the class patches out entirely

(``saelens.apply_to_saelens`` / ``revert_saelens`` and
``dictionary_learning.apply_to_dictionary_learning`` /
``revert_dictionary_learning`` likewise.) :func:`accelerate` here dispatches on
the object's library. Importing this package imports none of the libraries.

After patching, the library's classes, parameters, method names, signatures
and return types are unchanged; the encoder GEMM + top-k runs on
:func:`interpkernels.topk_encode` and the decode on
:func:`interpkernels.sparse_decode`, with weights passed as (transposed) views
of the library's own ``nn.Parameter`` objects. What changes is listed in each
module's docstring; common to all three:

- Pre-activations ``[..., M]`` are never materialized by the training paths.
  AuxK runs as ``topk_encode(..., latent_mask=dead)``. Where a method *returns*
  them (sparsify ``encode().pre_acts``, SAELens ``encode_with_hidden_pre`` and
  ``TrainStepOutput.hidden_pre``, dictionary_learning
  ``encode(x, return_topk=True)[3]``) the slot holds ``None`` unless the
  adapter was given ``materialize_pre_acts=True``, which restores the dense,
  differentiable tensor at the cost of one extra dense GEMM (as Liger's fused
  linear cross-entropy returns ``logits=None`` while training).
- Inside each row, the code ``(values, indices)`` is ordered by decreasing
  pre-activation (the libraries use ``torch.topk(sorted=False)``: unspecified
  order). Ties, including the zero activations of rows with fewer than k
  positive pre-activations, go to the higher pre-activation, then the lower
  index; ``torch.topk`` breaks ties arbitrarily, so the *index* of a
  zero-valued slot may differ (its contribution is zero either way).
- Dense ``[..., M]`` activations that an API returns by contract are built by
  scattering the sparse code. Such a tensor remembers its code, and the
  library's ``decode`` of that very tensor (not modified in place since, same
  ``requires_grad``, no ``retain_grad`` or tensor hooks) runs on
  ``sparse_decode``; any other dense input is decoded by the library's own
  matmul, exactly as before.
- Configurations the kernels do not cover (sparsify's ``groupmax`` encoder,
  SAELens BatchTopK / AbsTopK / hooks on ``hook_sae_acts_pre``,
  dictionary_learning ``use_threshold=True``, subclasses overriding the
  patched methods) run the library's original code.
- Under autocast the fused encoder ranks latents on float32-accumulated
  pre-activations where the libraries rank pre-activations rounded to the
  autocast dtype: near-ties can select different latents.
"""

from __future__ import annotations

import importlib
from typing import Any

from interpkernels.integrations._patching import accelerate, revert

__all__ = ["accelerate", "revert", "sparsify", "saelens", "dictionary_learning", "circuit_tracer"]
_SUBMODULES = ("sparsify", "saelens", "dictionary_learning", "circuit_tracer")


def __getattr__(name: str) -> Any:
    """The adapters import on first use, so importing this package imports none of the libraries."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
