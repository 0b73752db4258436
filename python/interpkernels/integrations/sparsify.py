"""interpkernels for EleutherAI sparsify (PyPI ``eai-sparsify``, tested with 1.3.3).

    from sparsify import SparseCoder, SparseCoderConfig
    from interpkernels.integrations.sparsify import accelerate, apply_to_sparsify

    sae = accelerate(SparseCoder(768, SparseCoderConfig(k=32)))   # this instance
    apply_to_sparsify()                                            # every SparseCoder (and Sae)

Patched: ``SparseCoder.encode``, ``decode`` and ``forward`` (the Trainer calls
``forward(x=..., y=..., dead_mask=...)``, so training runs on the kernels too).
Layouts are the library's: ``encoder.weight [M, d]`` and ``W_dec [M, d]`` go to
the ops as they are (no transposes, no copies); ``b_dec`` and ``W_skip`` as before.

What the patched methods do:

- ``encode(x)`` -> ``EncoderOutput(top_acts, top_indices, pre_acts)``:
  ``topk_encode(x - b_dec, encoder.weight, encoder.bias, k)`` (``x`` itself for
  transcoders). ``pre_acts`` is ``None`` unless ``materialize_pre_acts=True``
  (then ``relu(encoder(x - b_dec))``, dense and differentiable, as before).
- ``decode(top_acts, top_indices)``: ``sparse_decode(top_acts.to(dtype),
  top_indices, W_dec, b_dec)``, with autocast off around it, as sparsify's
  Triton decoder runs in the parameters' dtype.
- ``forward(x, y=None, *, dead_mask=None, total_variance=None)`` -> the same
  ``ForwardOutput`` fields, computed as the library does (FVU with
  ``(y - y.mean(0))`` as denominator, AuxK with ``k_aux = d // 2`` and its scale,
  Multi-TopK with ``4k``), but the ``[N, M]`` pre-activations never exist:
  AuxK is ``topk_encode(..., k_aux, latent_mask=dead_mask)`` (a second pass of
  the fused encoder, restricted to dead latents) and Multi-TopK takes one
  ``4k`` encode whose first ``k`` entries are the top-k (rows are sorted).

Behaviour that changes (the rest matches the unpatched library to float32
rounding, ~1e-6 relative):

1. **AuxK and Multi-TopK gradients reach the encoder** (a fix). sparsify's
   ``FusedEncoder`` returns no gradient for ``pre_acts``, so the AuxK loss
   trains only ``W_dec`` and never revives a dead latent's encoder row, and the
   Multi-TopK loss never reaches the encoder either. Patched, both losses
   differentiate through ``topk_encode``: ``encoder.weight``, ``encoder.bias``
   and ``b_dec`` (through ``x - b_dec``) receive their AuxK / Multi-TopK
   gradients, as in OpenAI's reference trainer. ``W_dec`` gradients and every
   gradient of ``fvu`` are unchanged.
2. **ReLU's derivative is applied to the selected latents** (a fix).
   ``FusedEncoder.backward`` passes the gradient of a selected latent whose
   pre-activation is <= 0 (its activation is 0) straight to the encoder; the
   patched path gives it zero gradient, as ``relu`` does. This only matters for
   rows with fewer than ``k`` positive pre-activations.
3. ``top_acts``/``top_indices`` rows are sorted by decreasing pre-activation;
   zero-valued slots (rows with < k positive pre-activations) may name other
   latents than ``torch.topk`` picks.
4. ``encode().pre_acts`` is ``None`` by default (see above); ``forward`` never
   needs it.
5. Inputs of any leading shape work, ``[batch, seq, d]`` included (the
   library's decoder and encoder backward require 2-D, sparsify issue 44).
   ``forward`` keeps the library's formulas verbatim, so for 3-D input
   ``total_variance`` is still ``(y - y.mean(0)).pow(2).sum()`` (mean over dim 0
   only), and ``k_aux = y.shape[-1] // 2``.
6. AuxK costs a second fused-encoder pass over the input (restricted to dead
   latents) instead of a ``torch.where`` + ``topk`` over the stored ``[N, M]``
   pre-activations: more FLOPs when dead latents exist, O(N * M) less memory.

7. Under autocast (sparsify's forward enables bf16 autocast on CUDA) the
   fused encoder ranks latents on float32-accumulated pre-activations of the
   bf16 inputs, where the library ranks bf16-rounded ones: near-ties can pick
   different latents (6 rows of 256 in a CPU bf16 check at d=32, M=128, k=8).

Not patched (the library's code runs): the encoder of ``activation="groupmax"``
(its ``decode`` still runs on ``sparse_decode``),
``set_decoder_norm_to_unit_norm``, ``remove_gradient_parallel_to_decoder_directions``,
loading and saving.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import interpkernels
from interpkernels.integrations._patching import (
    Patcher,
    autocast_disabled,
    default_options,
    set_instance_options,
)

__all__ = ["accelerate", "apply_to_sparsify", "revert", "revert_sparsify"]

_patcher = Patcher("sparsify")
_METHODS = ("encode", "decode", "forward")


def _classes():
    from sparsify.fused_encoder import EncoderOutput
    from sparsify.sparse_coder import ForwardOutput, SparseCoder

    return SparseCoder, EncoderOutput, ForwardOutput


def _uses_topk(sae) -> bool:
    return sae.cfg.activation == "topk"


def _encoder_input(sae, x: torch.Tensor) -> torch.Tensor:
    # As the library: x - b_dec with torch's type promotion (bf16 activations
    # meet fp32 parameters this way).
    return x if sae.cfg.transcode else x - sae.b_dec


def _decode(sae, acts: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """sparsify's ``decoder_impl(indices, acts.to(dtype), W_dec.mT)`` (+ bias):
    in the parameters' dtype whatever the autocast state."""
    with autocast_disabled(sae.W_dec.device):
        return interpkernels.sparse_decode(acts.to(sae.dtype), indices, sae.W_dec, bias)


def _encode(sae, original, options, x: torch.Tensor):
    if not _uses_topk(sae):
        return original(x)
    _, EncoderOutput, _ = _classes()
    x_in = _encoder_input(sae, x)
    weight, bias = sae.encoder.weight, sae.encoder.bias
    top_acts, top_indices = interpkernels.topk_encode(x_in, weight, bias, sae.cfg.k)
    pre_acts = F.relu(F.linear(x_in, weight, bias)) if options["materialize_pre_acts"] else None
    return EncoderOutput(top_acts, top_indices, pre_acts)


def _decode_method(sae, original, options, top_acts: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    assert sae.W_dec is not None, "Decoder weight was not initialized."
    return _decode(sae, top_acts, top_indices, sae.b_dec)


# The library wraps forward in this autocast ("improves performance by almost 2x").
@torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
def _forward(
    sae,
    original,
    options,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    dead_mask: torch.Tensor | None = None,
    total_variance: torch.Tensor | None = None,
):
    if not _uses_topk(sae) or sae.W_dec is None:
        return original(x, y, dead_mask=dead_mask, total_variance=total_variance)
    _, _, ForwardOutput = _classes()
    cfg = sae.cfg
    weight, bias = sae.encoder.weight, sae.encoder.bias
    x_in = _encoder_input(sae, x)

    # Multi-TopK: one 4k encode; its rows are sorted, so the first k are the top-k.
    k_encoded = 4 * cfg.k if cfg.multi_topk else cfg.k
    code_acts, code_indices = interpkernels.topk_encode(x_in, weight, bias, k_encoded)
    top_acts, top_indices = code_acts[..., : cfg.k], code_indices[..., : cfg.k]

    if y is None:
        y = x

    sae_out = _decode(sae, top_acts, top_indices, sae.b_dec)
    if sae.W_skip is not None:
        sae_out = sae_out + x.to(sae.dtype) @ sae.W_skip.mT

    e = y - sae_out

    if total_variance is None:
        total_variance = (y - y.mean(0)).pow(2).sum()

    if dead_mask is not None and (num_dead := int(dead_mask.sum())) > 0:
        k_aux = y.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        # Top-k_aux among dead latents only; differentiable into the encoder.
        auxk_acts, auxk_indices = interpkernels.topk_encode(x_in, weight, bias, k_aux, latent_mask=dead_mask)
        e_hat = _decode(sae, auxk_acts, auxk_indices, None)
        auxk_loss = (e_hat - e.detach()).pow(2).sum()
        auxk_loss = scale * auxk_loss / total_variance
    else:
        auxk_loss = sae_out.new_tensor(0.0)

    l2_loss = e.pow(2).sum()
    fvu = l2_loss / total_variance

    if cfg.multi_topk:
        top_acts, top_indices = code_acts, code_indices
        sae_out = _decode(sae, top_acts, top_indices, sae.b_dec)
        multi_topk_fvu = (sae_out - y).pow(2).sum() / total_variance
    else:
        multi_topk_fvu = sae_out.new_tensor(0.0)

    return ForwardOutput(sae_out, top_acts, top_indices, fvu, auxk_loss, multi_topk_fvu)


_FAST = {"encode": _encode, "decode": _decode_method, "forward": _forward}


def _install() -> type:
    SparseCoder, _, _ = _classes()
    for name in _METHODS:
        _patcher.install(SparseCoder, name, _FAST[name])
    return SparseCoder


def accelerate(sae: Any, *, materialize_pre_acts: bool = False) -> Any:
    """Run this ``SparseCoder`` (or ``Sae``) on interpkernels; returns it.

    The class gets pass-through wrappers (other instances keep the library's
    behaviour); the instance gets an options attribute, which survives
    ``copy.deepcopy`` and pickling and is not part of ``state_dict``.
    """
    SparseCoder = _install()
    if not isinstance(sae, SparseCoder):
        raise TypeError(f"accelerate: expected a sparsify SparseCoder, got {type(sae).__qualname__}")
    set_instance_options(sae, default_options(materialize_pre_acts))
    return sae


def apply_to_sparsify(*, materialize_pre_acts: bool = False) -> None:
    """Patch ``sparsify.SparseCoder`` (alias ``Sae``): every instance, existing
    or future, runs on interpkernels unless :func:`revert` was called on it."""
    SparseCoder = _install()
    _patcher.enable_class(SparseCoder, default_options(materialize_pre_acts))


def revert(sae: Any) -> Any:
    """This instance runs the library's own code again (class patches or not)."""
    set_instance_options(sae, False)
    return sae


def revert_sparsify() -> None:
    """Remove every class patch; instances patched by :func:`accelerate` run
    the library's code again (and resume the fused path if patched anew)."""
    _patcher.uninstall()
