"""interpkernels for saprmarks/dictionary_learning (PyPI ``dictionary-learning``, tested with 0.1.0).

    from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
    from interpkernels.integrations.dictionary_learning import accelerate, apply_to_dictionary_learning

    ae = accelerate(AutoEncoderTopK(768, 16384, k=32))    # this autoencoder
    trainer = accelerate(TopKTrainer(...))                 # this trainer and its autoencoder
    apply_to_dictionary_learning()                         # every AutoEncoderTopK and TopKTrainer

Patched: ``AutoEncoderTopK.encode / decode / forward`` and ``TopKTrainer.loss``
(which ``TopKTrainer.update`` calls). The layouts are the library's:
``encoder.weight [M, d]`` goes to ``topk_encode`` as it is, and the decoder
``nn.Linear(M, d, bias=False)`` as the view ``decoder.weight.T [M, d]``; no
parameter is copied or replaced. (The CPU ``sparse_decode`` kernel makes that
transposed view contiguous internally, one ``[M, d]`` copy per call; a
contiguous ``[M, d]`` decoder would avoid it, but would change the library's
layout.)

What the patched methods do:

- ``encode(x, return_topk=False, use_threshold=False)``: ``topk_encode(x - b_dec,
  encoder.weight, encoder.bias, k)``, scattered into the dense ``[..., M]``
  ``encoded_acts_BF`` the API returns (it remembers its code, so
  ``decode(encode(x))`` decodes sparsely). With ``return_topk=True`` it returns
  ``(encoded_acts_BF, top_acts_BK, top_indices_BK, post_relu_acts_BF)``, the last
  ``None`` unless ``materialize_pre_acts=True`` (then ``relu(encoder(x - b_dec))``
  as before). ``use_threshold=True`` runs the library's code.
- ``decode(f)``: ``sparse_decode(code, decoder.weight.T) + b_dec`` for a tensor
  from the patched ``encode``; ``decoder(f) + b_dec`` for any other.
- ``forward(x, output_features=False)``: no ``[..., M]`` tensor unless
  ``output_features=True`` asks for it.
- ``TopKTrainer.loss(x, step, logging=False)``: the library's loss (threshold
  update, firing counts, L2, AuxK normalized as OpenAI's) without
  ``post_relu_acts_BF``: AuxK is ``topk_encode(x - b_dec, ..., k_aux,
  latent_mask=dead_features)`` decoded without bias. ``f`` is only built when
  ``logging=True`` returns it.

Behaviour that changes (outputs, losses and all gradients otherwise match the
library to float32 rounding, ~1e-6 relative; AuxK gradients reach the encoder
in both):

1. ``encode(x, return_topk=True)[3]`` (``post_relu_acts_BF``) is ``None`` by
   default (see above); the patched ``TopKTrainer.loss`` does not need it. An
   unpatched trainer driving a patched autoencoder cannot compute AuxK from
   ``None``: patch both (``accelerate(trainer)`` or
   ``apply_to_dictionary_learning()``), or pass ``materialize_pre_acts=True``.
2. Row order and zero-slot tie-breaking of ``top_acts_BK`` / ``top_indices_BK``
   as described in ``interpkernels.integrations``; through
   ``did_fire[top_indices_BK]`` this can change which latents the trainer
   counts as having fired in a row with fewer than k positive pre-activations
   (the library counts arbitrary zero-activation latents there, the patched
   code those with the highest pre-activations).
3. Inputs of any leading shape work in ``encode`` / ``decode`` / ``forward``
   (the trainer itself assumes ``[B, d]``, as before).
4. Under autocast, latents are ranked on float32-accumulated pre-activations
   (the library: ``nn.Linear`` output rounded to the autocast dtype), so
   near-ties can select differently; dtypes of all outputs are the library's.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

import interpkernels
from interpkernels.integrations._patching import (
    Patcher,
    code_of,
    default_options,
    dense_from_code,
    not_overridden,
    options_of,
    original_method,
    set_instance_options,
    tag_with_code,
)

__all__ = ["accelerate", "apply_to_dictionary_learning", "revert", "revert_dictionary_learning"]

_patcher = Patcher("dictionary_learning")
_AE_METHODS = ("encode", "decode", "forward")
_TRAINER_METHODS = ("loss",)


def _lib():
    from dictionary_learning.trainers import top_k

    return top_k


def _eligible(ae) -> bool:
    top_k = _lib()
    return isinstance(ae, top_k.AutoEncoderTopK) and not_overridden(ae, top_k.AutoEncoderTopK, *_AE_METHODS)


def _encode_signature() -> inspect.Signature:
    return inspect.signature(original_method(_lib().AutoEncoderTopK, "encode"))


def _encoder_input(ae, x: torch.Tensor) -> torch.Tensor:
    return x - ae.b_dec  # as the library (with torch's type promotion)


def _encode_code(ae, x: torch.Tensor):
    """(encoder input, top_acts_BK, top_indices_BK)."""
    x_in = _encoder_input(ae, x)
    values, indices = interpkernels.topk_encode(x_in, ae.encoder.weight, ae.encoder.bias, int(ae.k))
    return x_in, values, indices


def _decoder_rows(ae) -> torch.Tensor:
    return ae.decoder.weight.T  # [M, d] view of nn.Linear(M, d).weight [d, M]


def _decode_code(ae, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    # decoder(f) + b_dec; the bias added outside the op so that dtypes promote
    # as the library's nn.Linear output + fp32 b_dec does under autocast.
    return interpkernels.sparse_decode(values, indices, _decoder_rows(ae)) + ae.b_dec


def _encode(ae, original, options, x: torch.Tensor, *args: Any, **kwargs: Any):
    try:
        bound = _encode_signature().bind(ae, x, *args, **kwargs)
    except TypeError:
        return original(x, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    return_topk = arguments.pop("return_topk", False)
    use_threshold = arguments.pop("use_threshold", False)
    known = {"self", "x"}
    if use_threshold or not _eligible(ae) or set(arguments) - known:
        return original(x, *args, **kwargs)
    x_in, values, indices = _encode_code(ae, x)
    encoded_acts_BF = tag_with_code(dense_from_code(values, indices, ae.encoder.weight.shape[0]), values, indices)
    if not return_topk:
        return encoded_acts_BF
    post_relu = F.relu(ae.encoder(x_in)) if options["materialize_pre_acts"] else None
    return encoded_acts_BF, values, indices, post_relu


def _decode(ae, original, options, f: torch.Tensor) -> torch.Tensor:
    code = code_of(f)
    if code is None or not _eligible(ae) or f.shape[-1] != ae.encoder.weight.shape[0]:
        return original(f)
    return _decode_code(ae, code.values, code.indices)


def _forward_uses_plain_encode() -> bool:
    """The library's forward calls ``self.encode(x)`` with defaults: the fused
    path only stands in for it when those defaults mean top-k (no threshold)."""
    parameter = _encode_signature().parameters.get("use_threshold")
    return parameter is None or parameter.default is False


def _forward(ae, original, options, x: torch.Tensor, output_features: bool = False):
    if not _eligible(ae) or not _forward_uses_plain_encode():
        return original(x, output_features)
    _, values, indices = _encode_code(ae, x)
    x_hat_BD = _decode_code(ae, values, indices)
    if not output_features:
        return x_hat_BD
    return x_hat_BD, tag_with_code(dense_from_code(values, indices, ae.encoder.weight.shape[0]), values, indices)


def _auxiliary_loss(trainer, residual_BD: torch.Tensor, x_in: torch.Tensor) -> torch.Tensor:
    """TopKTrainer.get_auxiliary_loss without post_relu_acts_BF."""
    ae = trainer.ae
    dead_features = trainer.num_tokens_since_fired >= trainer.dead_feature_threshold
    trainer.dead_features = int(dead_features.sum())

    if trainer.dead_features > 0:
        k_aux = min(trainer.top_k_aux, trainer.dead_features)
        auxk_acts, auxk_indices = interpkernels.topk_encode(
            x_in, ae.encoder.weight, ae.encoder.bias, k_aux, latent_mask=dead_features
        )
        # decoder(), not decode(): no bias, as the library.
        x_reconstruct_aux = interpkernels.sparse_decode(auxk_acts, auxk_indices, _decoder_rows(ae))
        l2_loss_aux = (residual_BD.float() - x_reconstruct_aux.float()).pow(2).sum(dim=-1).mean()

        trainer.pre_norm_auxk_loss = l2_loss_aux

        residual_mu = residual_BD.mean(dim=0)[None, :].broadcast_to(residual_BD.shape)
        loss_denom = (residual_BD.float() - residual_mu.float()).pow(2).sum(dim=-1).mean()
        normalized_auxk_loss = l2_loss_aux / loss_denom

        return normalized_auxk_loss.nan_to_num(0.0)
    trainer.pre_norm_auxk_loss = -1
    return torch.tensor(0, dtype=residual_BD.dtype, device=residual_BD.device)


def _loss(trainer, original, options, x: torch.Tensor, step=None, logging: bool = False):
    top_k = _lib()
    ae = trainer.ae
    if (
        not isinstance(trainer, top_k.TopKTrainer)
        or not not_overridden(trainer, top_k.TopKTrainer, "get_auxiliary_loss", "update_threshold")
        or not _eligible(ae)
        or options_of(ae) is None  # its autoencoder was reverted: the library's loss
    ):
        return original(x, step=step, logging=logging)

    x_in, top_acts_BK, top_indices_BK = _encode_code(ae, x)

    if step > trainer.threshold_start_step:
        trainer.update_threshold(top_acts_BK)

    x_hat = _decode_code(ae, top_acts_BK, top_indices_BK)

    e = x - x_hat

    trainer.effective_l0 = top_acts_BK.size(1)

    num_tokens_in_step = x.size(0)
    did_fire = torch.zeros_like(trainer.num_tokens_since_fired, dtype=torch.bool)
    did_fire[top_indices_BK.flatten()] = True
    trainer.num_tokens_since_fired += num_tokens_in_step
    trainer.num_tokens_since_fired[did_fire] = 0

    l2_loss = e.pow(2).sum(dim=-1).mean()
    auxk_loss = _auxiliary_loss(trainer, e.detach(), x_in) if trainer.auxk_alpha > 0 else 0

    loss = l2_loss + trainer.auxk_alpha * auxk_loss

    if not logging:
        return loss
    from collections import namedtuple

    f = tag_with_code(
        dense_from_code(top_acts_BK, top_indices_BK, ae.encoder.weight.shape[0]), top_acts_BK, top_indices_BK
    )
    return namedtuple("LossLog", ["x", "x_hat", "f", "losses"])(
        x,
        x_hat,
        f,
        {"l2_loss": l2_loss.item(), "auxk_loss": auxk_loss.item(), "loss": loss.item()},
    )


_FAST = {"encode": _encode, "decode": _decode, "forward": _forward, "loss": _loss}


def _install():
    top_k = _lib()
    for name in _AE_METHODS:
        _patcher.install(top_k.AutoEncoderTopK, name, _FAST[name])
    for name in _TRAINER_METHODS:
        _patcher.install(top_k.TopKTrainer, name, _FAST[name])
    return top_k.AutoEncoderTopK, top_k.TopKTrainer


def accelerate(obj: Any, *, materialize_pre_acts: bool = False) -> Any:
    """Run this ``AutoEncoderTopK``, or this ``TopKTrainer`` and its ``ae``, on
    interpkernels; returns it.

    The classes get pass-through wrappers (other instances keep the library's
    behaviour); the instance gets an options attribute, which survives
    ``copy.deepcopy`` and pickling and is not part of ``state_dict``.
    """
    AutoEncoderTopK, TopKTrainer = _install()
    options = default_options(materialize_pre_acts)
    if isinstance(obj, TopKTrainer):
        set_instance_options(obj, options)
        set_instance_options(obj.ae, dict(options))
    elif isinstance(obj, AutoEncoderTopK):
        set_instance_options(obj, options)
    else:
        raise TypeError(
            f"accelerate: expected a dictionary_learning AutoEncoderTopK or TopKTrainer, got {type(obj).__qualname__}"
        )
    return obj


def apply_to_dictionary_learning(*, materialize_pre_acts: bool = False) -> None:
    """Patch ``AutoEncoderTopK`` and ``TopKTrainer``: every instance, existing
    or future, runs on interpkernels unless :func:`revert` was called on it."""
    options = default_options(materialize_pre_acts)
    for cls in _install():
        _patcher.enable_class(cls, options)


def revert(obj: Any) -> Any:
    """This object (a trainer: and its ``ae``) runs the library's own code again."""
    set_instance_options(obj, False)
    ae = getattr(obj, "ae", None)
    if ae is not None and isinstance(ae, torch.nn.Module):
        set_instance_options(ae, False)
    return obj


def revert_dictionary_learning() -> None:
    """Remove every class patch; instances patched by :func:`accelerate` run
    the library's code again (and resume the fused path if patched anew)."""
    _patcher.uninstall()
