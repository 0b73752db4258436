"""interpkernels for SAELens (PyPI ``sae-lens``, tested with 6.54.12).

    from sae_lens import TopKSAE, TopKTrainingSAE
    from interpkernels.integrations.saelens import accelerate, apply_to_saelens

    sae = accelerate(TopKSAE.from_pretrained(...))      # this instance
    apply_to_saelens()                                   # every TopKSAE / TopKTrainingSAE

Patched: ``TopKSAE.encode / decode / forward`` and ``TopKTrainingSAE.encode /
encode_with_hidden_pre / decode / forward / training_forward_pass`` (the latter
is what ``SAETrainer`` calls, so training runs on the kernels too). SAELens
stores ``W_enc [d_in, M]``: the ops get the view ``W_enc.T [M, d_in]``, and
``W_dec [M, d_in]`` as it is; no parameter is copied or replaced. With
``rescale_acts_by_decoder_norm`` (the training default) the encoder the op sees
is ``W_enc.T * ||W_dec||[:, None]`` and ``b_enc * ||W_dec||``: an ``[M, d_in]``
product computed per call (as the library's ``hidden_pre * W_dec.norm()``, but
O(M d) instead of O(N M)), differentiable into ``W_enc``, ``b_enc`` and ``W_dec``.

What the patched methods do (``process_sae_in``, ``hook_sae_input``,
activation normalization, ``hook_sae_recons``, ``run_time_activation_norm_fn_out``,
``reshape_fn_out``, ``use_error_term``, ``hook_sae_error`` and
``hook_sae_output`` all run as in the library):

- ``encode(x)`` -> dense ``[..., M]`` (or the library's COO tensor when
  ``use_sparse_activations``): ``topk_encode`` then a scatter, passed through
  ``hook_sae_acts_post``. The result remembers its sparse code, so
  ``decode(encode(x))`` decodes sparsely (see ``interpkernels.integrations``).
- ``decode(feature_acts)``: ``sparse_decode`` for a tensor from the patched
  ``encode`` (values divided by ``||W_dec||`` when rescaling, as the library),
  the library's matmul / ``torch.sparse.mm`` for any other tensor.
- ``forward(x)``: encode and decode without any ``[..., M]`` tensor, unless a
  hook sits on ``hook_sae_acts_post`` (then the dense activations go through
  it and whatever the hook returns is decoded).
- ``training_forward_pass(step_input)``: MSE loss and the TopK AuxK loss as
  ``TopKTrainingSAE`` computes them. AuxK selects the top ``k_aux`` dead
  latents with ``topk_encode(..., latent_mask=dead_neuron_mask)`` and, as
  SAELens, uses their *raw* pre-activations (negative ones included, no ReLU),
  recomputed for the selected entries only with the ``gathered_dot`` op.

Behaviour that changes (outputs, losses and all gradients otherwise match the
library to float32 rounding, ~1e-6 relative; AuxK gradients reach the encoder
in both):

1. ``encode_with_hidden_pre`` returns ``(feature_acts, None)`` and
   ``TrainStepOutput.hidden_pre`` is ``None`` unless ``materialize_pre_acts=True``
   (then the dense, differentiable ``hidden_pre`` as before, one extra GEMM).
   SAELens' trainer does not read it.
2. ``TrainStepOutput.feature_acts`` is still the dense ``[N, M]`` tensor (the
   trainer reads it for firing counts and L0); with the config's
   ``use_sparse_activations=True`` it is the library's COO tensor, built from
   the code, and then nothing ``[N, M]`` is materialized.
3. ``hook_sae_acts_pre`` sees nothing on the fused path: if it has hooks
   (``run_with_cache``, ``add_hook``), every patched method runs the library's
   code for that call, so hooks see exactly what they saw before.
4. Row order and zero-slot tie-breaking of the code as described in
   ``interpkernels.integrations`` (the dense outputs are unaffected, except
   which zero-valued latents a COO tensor lists).
5. ``use_sparse_activations=True`` with ``rescale_acts_by_decoder_norm=True``
   (the training default) trains: the library's backward of
   ``feature_acts * (1 / ||W_dec||)`` on its COO tensor fails on CPU with torch
   2.13 (no ``aten::view`` for SparseCPU); the patched path scales the code.
6. Under autocast, latents are ranked on float32-accumulated pre-activations
   (the library: a matmul rounded to the autocast dtype, plus fp32 ``b_enc``),
   so near-ties can select differently. The activations keep the library's
   dtype (``b_enc``'s, float32 for float32 parameters).

Not patched (the library's code runs): BatchTopK, Matryoshka, AbsTopK,
JumpReLU, Gated, Standard SAEs and transcoders, and any subclass that
overrides a patched method or changes the activation function.
"""

from __future__ import annotations

from typing import Any

import torch

import interpkernels
from interpkernels.integrations._patching import (
    Patcher,
    code_of,
    default_options,
    dense_from_code,
    module_has_hooks,
    not_overridden,
    set_instance_options,
    tag_with_code,
)

__all__ = ["accelerate", "apply_to_saelens", "revert", "revert_saelens"]

_patcher = Patcher("saelens")
_INFERENCE_METHODS = ("encode", "decode", "forward")
_TRAINING_METHODS = ("encode", "encode_with_hidden_pre", "decode", "forward", "training_forward_pass")


def _lib():
    from sae_lens.saes import sae as sae_module
    from sae_lens.saes import topk_sae

    return topk_sae, sae_module


def _topk_activation(sae):
    """The library's TopK activation module when the fused path applies, else None."""
    topk_sae, _ = _lib()
    fn = getattr(sae, "activation_fn", None)
    return fn if type(fn) is topk_sae.TopK else None


def _patched_class(sae) -> type | None:
    topk_sae, _ = _lib()
    for cls in (topk_sae.TopKTrainingSAE, topk_sae.TopKSAE):
        if isinstance(sae, cls):
            return cls
    return None


def _eligible(sae) -> bool:
    cls = _patched_class(sae)
    if cls is None or _topk_activation(sae) is None:
        return False
    methods = _TRAINING_METHODS if cls is _lib()[0].TopKTrainingSAE else _INFERENCE_METHODS
    return not_overridden(sae, cls, *methods)


def _encoder(sae):
    """(W [M, d_in], b [M], decoder norms or None): the affine map whose output is
    the library's hidden_pre."""
    weight, bias = sae.W_enc.T, sae.b_enc
    if sae.cfg.rescale_acts_by_decoder_norm:
        norms = sae.W_dec.norm(dim=-1)
        return weight * norms[:, None], bias * norms, norms
    return weight, bias, None


def _hidden_pre_dtype(sae, sae_in: torch.Tensor) -> torch.dtype:
    """The dtype of the library's ``hidden_pre``: the matmul's (the autocast
    dtype under autocast) promoted with ``b_enc``'s (and the norms')."""
    device_type = sae_in.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = torch.promote_types(sae_in.dtype, sae.W_enc.dtype)
    dtype = torch.promote_types(dtype, sae.b_enc.dtype)
    if sae.cfg.rescale_acts_by_decoder_norm:
        dtype = torch.promote_types(dtype, sae.W_dec.dtype)
    return dtype


def _encode_code(sae, x: torch.Tensor):
    """process_sae_in, then the fused encoder. Returns (sae_in, W, b, norms, values, indices)."""
    sae_in = sae.process_sae_in(x)
    weight, bias, norms = _encoder(sae)
    values, indices = interpkernels.topk_encode(sae_in, weight, bias, _topk_activation(sae).k)
    # Under autocast the op computes in the autocast dtype; the library's
    # activations come out of ``matmul + b_enc``, i.e. promoted to b_enc's dtype.
    values = values.to(_hidden_pre_dtype(sae, sae_in))
    return sae_in, weight, bias, norms, values, indices


def _acts_tensor(sae, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """What the library's TopK activation returns: dense, or COO when
    use_sparse_activations (same layout as sae_lens' TopK.forward)."""
    num_latents = sae.W_dec.shape[0]
    if not _topk_activation(sae).use_sparse_activations:
        return dense_from_code(values, indices, num_latents)
    batch_shape = values.shape[:-1]
    k = values.shape[-1]
    rows = torch.arange(batch_shape.numel(), device=values.device).repeat_interleave(k)
    coords = torch.unravel_index(rows, tuple(batch_shape)) if len(batch_shape) else ()
    sparse_indices = torch.stack([*coords, indices.flatten()])
    return torch.sparse_coo_tensor(sparse_indices, values.flatten(), (*batch_shape, num_latents))


def _post_acts(sae, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The activations through hook_sae_acts_post, tagged with their code
    before the hook: one that edits them in place or returns another tensor
    leaves a tensor whose code no longer applies (code_of says None)."""
    return sae.hook_sae_acts_post(tag_with_code(_acts_tensor(sae, values, indices), values, indices))


def _dense_hidden_pre(sae, sae_in: torch.Tensor) -> torch.Tensor:
    hidden_pre = sae_in @ sae.W_enc + sae.b_enc
    if sae.cfg.rescale_acts_by_decoder_norm:
        hidden_pre = hidden_pre * sae.W_dec.norm(dim=-1)
    return hidden_pre


def _decode_code(sae, values: torch.Tensor, indices: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """The library's decode of the dense tensor this code describes."""
    if sae.cfg.rescale_acts_by_decoder_norm:
        if norms is None:
            norms = sae.W_dec.norm(dim=-1)
        values = values * (1 / norms)[indices]
    sae_out_pre = interpkernels.sparse_decode(values, indices, sae.W_dec) + sae.b_dec
    sae_out_pre = sae.hook_sae_recons(sae_out_pre)
    sae_out_pre = sae.run_time_activation_norm_fn_out(sae_out_pre)
    return sae.reshape_fn_out(sae_out_pre, sae.d_head)


# ---------------------------------------------------------------------------
# Patched methods: fast(sae, original, options, *args, **kwargs).


def _encode(sae, original, options, x: torch.Tensor) -> torch.Tensor:
    if not _eligible(sae) or module_has_hooks(sae.hook_sae_acts_pre):
        return original(x)
    _, _, _, _, values, indices = _encode_code(sae, x)
    return _post_acts(sae, values, indices)


def _encode_with_hidden_pre(sae, original, options, x: torch.Tensor):
    if not _eligible(sae) or module_has_hooks(sae.hook_sae_acts_pre):
        return original(x)
    sae_in, _, _, _, values, indices = _encode_code(sae, x)
    hidden_pre = _dense_hidden_pre(sae, sae_in) if options["materialize_pre_acts"] else None
    return _post_acts(sae, values, indices), hidden_pre


def _decode(sae, original, options, feature_acts: torch.Tensor) -> torch.Tensor:
    code = code_of(feature_acts)
    if code is None or not _eligible(sae) or feature_acts.shape[-1] != sae.W_dec.shape[0]:
        return original(feature_acts)
    return _decode_code(sae, code.values, code.indices)


def _forward(sae, original, options, x: torch.Tensor) -> torch.Tensor:
    if not _eligible(sae) or module_has_hooks(sae.hook_sae_acts_pre) or module_has_hooks(sae.hook_sae_acts_post):
        # The library's forward calls the patched encode / decode.
        return original(x)
    _, sae_module = _lib()
    _, _, _, norms, values, indices = _encode_code(sae, x)
    sae_out = _decode_code(sae, values, indices, norms)

    if sae.use_error_term:
        with torch.no_grad():
            # Recompute without hooks for the true error term, as the library.
            with sae_module._disable_hooks(sae):
                _, _, _, clean_norms, clean_values, clean_indices = _encode_code(sae, x)
                x_reconstruct_clean = _decode_code(sae, clean_values, clean_indices, clean_norms)
            sae_error = sae.hook_sae_error(x - x_reconstruct_clean)
        sae_out = sae_out + sae_error

    return sae.hook_sae_output(sae_out)


def _gathered_pre(
    sae_in: torch.Tensor, indices: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """pre[..., j] = sae_in . weight[indices[..., j]] + bias[indices[..., j]],
    for the selected entries only (the registered gathered_dot op, with autograd)."""
    device_type = sae_in.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        sae_in, weight = sae_in.to(dtype), weight.to(dtype)
    d, k = sae_in.shape[-1], indices.shape[-1]
    dots = torch.ops.interpkernels.gathered_dot(sae_in.reshape(-1, d), indices.reshape(-1, k), weight)
    return dots.view(indices.shape) + bias[indices]


def _topk_aux_loss(sae, step_input, sae_in, weight, bias, norms, sae_out) -> torch.Tensor:
    """TopKTrainingSAE.calculate_topk_aux_loss without the [N, M] hidden_pre."""
    dead_neuron_mask = step_input.dead_neuron_mask
    if dead_neuron_mask is None or (num_dead := int(dead_neuron_mask.sum())) == 0:
        return sae_out.new_tensor(0.0)
    if sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(
            "TopK auxiliary loss does not support activation normalization "
            f"(normalize_activations={sae.cfg.normalize_activations!r}). "
            "The aux loss reconstruction would be in normalized space while the "
            "residual is in the original space, producing incorrect gradients."
        )
    residual = (step_input.sae_in - sae_out).detach()
    k_aux = step_input.sae_in.shape[-1] // 2
    scale = min(num_dead / k_aux, 1.0)
    k_aux = min(k_aux, num_dead)

    # The selection of the library's topk over where(dead, hidden_pre, -inf);
    # its values are the raw (un-ReLU'd) pre-activations.
    _, aux_indices = interpkernels.topk_encode(sae_in, weight, bias, k_aux, latent_mask=dead_neuron_mask)
    aux_values = _gathered_pre(sae_in, aux_indices, weight, bias)
    if sae.cfg.rescale_acts_by_decoder_norm:
        aux_values = aux_values * (1 / norms)[aux_indices]
    recons = interpkernels.sparse_decode(aux_values, aux_indices, sae.W_dec)
    recons = sae.reshape_fn_out(recons, sae.d_head)
    auxk_loss = (recons - residual).pow(2).sum(dim=-1).mean()
    return sae.cfg.aux_loss_coefficient * scale * auxk_loss


def _training_forward_pass(sae, original, options, step_input):
    topk_sae, sae_module = _lib()
    base = topk_sae.TopKTrainingSAE
    if (
        not _eligible(sae)
        or not not_overridden(sae, base, "calculate_aux_loss", "calculate_topk_aux_loss")
        or module_has_hooks(sae.hook_sae_acts_pre)
    ):
        return original(step_input)
    sae_in, weight, bias, norms, values, indices = _encode_code(sae, step_input.sae_in)
    if module_has_hooks(sae.hook_sae_acts_post):
        feature_acts = _post_acts(sae, values, indices)
        if code_of(feature_acts) is None:  # the hook changed them: decode what it returned
            sae_out = sae.decode(feature_acts)
        else:
            sae_out = _decode_code(sae, values, indices, norms)
    else:  # an identity hook point: skipped, and no tag (torch.compile-friendly)
        feature_acts = _acts_tensor(sae, values, indices)
        sae_out = _decode_code(sae, values, indices, norms)

    per_item_mse_loss = sae.mse_loss_fn(sae_out, step_input.sae_in)
    mse_loss = per_item_mse_loss.sum(dim=-1).mean()
    aux_loss = _topk_aux_loss(sae, step_input, sae_in, weight, bias, norms, sae_out)
    losses = {"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux_loss}
    total_loss = mse_loss + aux_loss

    hidden_pre = _dense_hidden_pre(sae, sae_in) if options["materialize_pre_acts"] else None
    return sae_module.TrainStepOutput(
        sae_in=step_input.sae_in,
        sae_out=sae_out,
        feature_acts=feature_acts,
        hidden_pre=hidden_pre,
        loss=total_loss,
        losses=losses,
    )


_FAST = {
    "encode": _encode,
    "encode_with_hidden_pre": _encode_with_hidden_pre,
    "decode": _decode,
    "forward": _forward,
    "training_forward_pass": _training_forward_pass,
}


def _install() -> tuple[type, type]:
    topk_sae, _ = _lib()
    for name in _INFERENCE_METHODS:
        _patcher.install(topk_sae.TopKSAE, name, _FAST[name])
    for name in _TRAINING_METHODS:
        _patcher.install(topk_sae.TopKTrainingSAE, name, _FAST[name])
    return topk_sae.TopKSAE, topk_sae.TopKTrainingSAE


def accelerate(sae: Any, *, materialize_pre_acts: bool = False) -> Any:
    """Run this ``TopKSAE`` / ``TopKTrainingSAE`` on interpkernels; returns it.

    The classes get pass-through wrappers (other instances keep the library's
    behaviour); the instance gets an options attribute, which survives
    ``copy.deepcopy`` and pickling and is not part of ``state_dict``.
    """
    classes = _install()
    if not isinstance(sae, classes):
        raise TypeError(f"accelerate: expected a SAELens TopKSAE or TopKTrainingSAE, got {type(sae).__qualname__}")
    set_instance_options(sae, default_options(materialize_pre_acts))
    return sae


def apply_to_saelens(*, materialize_pre_acts: bool = False) -> None:
    """Patch ``sae_lens.TopKSAE`` and ``sae_lens.TopKTrainingSAE``: every
    instance, existing or future, runs on interpkernels unless :func:`revert`
    was called on it (subclasses with another activation keep the library's code)."""
    options = default_options(materialize_pre_acts)
    for cls in _install():
        _patcher.enable_class(cls, options)


def revert(sae: Any) -> Any:
    """This instance runs the library's own code again (class patches or not)."""
    set_instance_options(sae, False)
    return sae


def revert_saelens() -> None:
    """Remove every class patch; instances patched by :func:`accelerate` run
    the library's code again (and resume the fused path if patched anew)."""
    _patcher.uninstall()
