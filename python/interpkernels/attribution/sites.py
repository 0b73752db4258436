"""Where the sparse coders sit in a model, and the forward hooks that read and splice there.

A *site* is a submodule (named as in ``model.named_modules()``) with a sparse
coder attached. An SAE encodes the submodule's output x and a transcoder its
input; either way the output is written as ``x_hat(f) + eps`` with
``eps = x - x_hat(f)`` detached, so the forward values are the model's while
the backward pass sees the code f. What reaches the model *upstream* of a
site depends on ``gradient`` (:data:`GRADIENTS`):

- ``"straight_through"`` (default; feature-circuits' ``x.grad = x_recon.grad``):
  the site's output is ``x + (x_hat(f) - x_hat(f).detach())``. Its gradient g
  reaches f (``dm/df = W_dec g``) and passes unchanged to the submodule's real
  output, so upstream gradients are the real model's, whichever other sites
  are hooked.
- ``"through_coders"``: the output is ``x_hat(f(x)) + eps``, so upstream
  gradients flow only through the coder's encoder Jacobian (rank k for TopK):
  the gradients of the model with every downstream site replaced by its coder
  and a frozen error, a different quantity from the real model's response.

Coders are duck-typed: ``encode(x)`` returning ``(values, indices, ...)``
(interpkernels.nn modules; sparsify's ``EncoderOutput`` after
``interpkernels.integrations.sparsify.accelerate``), ``decode(values, indices)``
and ``W_dec [M, d_out]``. A coder with ``reconstruct(x, values, indices)``
(interpkernels.nn) reconstructs through it, so a transcoder's skip path counts
as part of x_hat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from interpkernels._hooks import forward_hooks
from interpkernels.activations import call_model, output_tensor
from interpkernels.nn import Transcoder


GRADIENTS = ("straight_through", "through_coders")


@dataclass
class SiteCode:
    """What one forward pass saw at a site."""

    values: torch.Tensor  # [..., k] the code x_hat is decoded from (dm/dvalues = W_dec g)
    indices: torch.Tensor  # [..., k]
    error: torch.Tensor  # [..., d] eps = x - x_hat, detached
    read: torch.Tensor  # [..., d_in] what the coder encoded (the output, or a transcoder's input)
    # [..., k] the encoder's output, a function of everything upstream (edges differentiate it);
    # the same tensor as `values` with gradient="through_coders".
    encoded: torch.Tensor | None = None
    spliced: torch.Tensor | None = None  # [..., d] the tensor downstream layers saw (the output, as spliced)


def reads_input(coder: nn.Module) -> bool:
    """Transcoders encode the submodule's input; SAEs its output."""
    return isinstance(coder, Transcoder)


def decoder_weight(coder: nn.Module) -> torch.Tensor:
    weight = getattr(coder, "W_dec", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"sites: coder {type(coder).__name__} has no W_dec [M, d] tensor")
    return weight


def encode(coder: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    code = coder.encode(x)
    return code[0], code[1]


def reconstruct(coder: nn.Module, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if hasattr(coder, "reconstruct"):
        return coder.reconstruct(x, values, indices)
    return coder.decode(values, indices)


def resolve_sites(model: nn.Module, sites: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """``{name: submodule}`` in the order the names were given; unknown names
    raise a KeyError that lists a few of the model's names."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(sites, Mapping) or not sites:
        raise TypeError("sites: expected a non-empty mapping {module name: sparse coder}")
    modules = dict(model.named_modules())
    resolved = {}
    for name, coder in sites.items():
        if name not in modules:
            known = [n for n in modules if n][:8]
            raise KeyError(f"sites: the model has no submodule named {name!r} (it has e.g. {known})")
        if not hasattr(coder, "encode"):
            raise TypeError(f"sites[{name!r}]: expected a sparse coder with encode/decode, got {type(coder).__name__}")
        decoder_weight(coder)
        resolved[name] = modules[name]
    return resolved


def replace_output(output: object, tensor: torch.Tensor) -> object:
    if isinstance(output, tuple):
        return (tensor, *output[1:])
    if isinstance(output, list):
        return [tensor, *output[1:]]
    return tensor


def check_width(name: str, coder: nn.Module, read: torch.Tensor, written: torch.Tensor) -> None:
    d_in = getattr(coder, "d_in", None)
    d_out = decoder_weight(coder).shape[1]
    if (d_in is not None and read.shape[-1] != d_in) or written.shape[-1] != d_out:
        raise ValueError(f"sites[{name!r}]: the coder maps width {d_in} to {d_out}, but the submodule "
                         f"{'reads' if reads_input(coder) else 'outputs'} width {read.shape[-1]} and outputs "
                         f"width {written.shape[-1]}")


def code_at(name: str, coder: nn.Module, args: tuple, output: object, gradient: str = "straight_through"
            ) -> tuple[SiteCode, torch.Tensor]:
    """Encode at a site; returns the record and the spliced output (see the module's docstring)."""
    written = output_tensor(name, output)
    read = args[0] if reads_input(coder) else written
    check_width(name, coder, read, written)
    encoded, indices = encode(coder, read)
    straight_through = gradient == "straight_through"
    values = encoded
    if torch.is_grad_enabled() and (straight_through or not encoded.requires_grad):
        # A leaf of its own: straight through, x_hat must not lead back to the
        # encoder; through the coders of a frozen model, the code still needs gradients.
        values = encoded.detach().requires_grad_()
    x_hat = reconstruct(coder, read.detach() if straight_through else read, values, indices)
    error = (written - x_hat).detach()
    spliced = written + (x_hat - x_hat.detach()) if straight_through else x_hat + error
    return SiteCode(values, indices, error, read, encoded, spliced), spliced


Hook = Callable[[str, nn.Module, nn.Module, tuple, object], object]


def hooked(modules: Mapping[str, nn.Module], coders: Mapping[str, nn.Module], hook: Hook
           ) -> AbstractContextManager[None]:
    """Forward hooks ``hook(name, coder, module, args, output)`` on every site,
    removed on exit whatever happens inside."""
    return forward_hooks(modules, {name: partial(hook, name, coders[name]) for name in modules})


def record_codes(model: nn.Module, modules: Mapping[str, nn.Module], coders: Mapping[str, nn.Module],
                 inputs: object) -> tuple[object, dict[str, SiteCode]]:
    """The model's output, and the codes and errors at every site, without
    gradients and without changing the forward pass."""
    codes: dict[str, SiteCode] = {}

    def hook(name, coder, module, args, output):
        codes[name], _ = code_at(name, coder, args, output)
        codes[name].spliced = output_tensor(name, output)
        return None

    with torch.no_grad(), hooked(modules, coders, hook):
        output = call_model(model, inputs)
    require_all_ran(modules, codes)
    return output, codes


def require_all_ran(modules: Mapping[str, nn.Module], codes: Mapping[str, SiteCode]) -> None:
    missing = [name for name in modules if name not in codes]
    if missing:
        raise ValueError(f"sites: the forward pass never ran the submodules {missing}")


def spliced_run(model: nn.Module, modules: Mapping[str, nn.Module], coders: Mapping[str, nn.Module],
                inputs: object, fixed: Mapping[str, torch.Tensor] | None = None,
                gradient: str = "straight_through") -> tuple[object, dict[str, SiteCode]]:
    """Forward pass with every site's output spliced as ``gradient`` says (module docstring).

    ``fixed[name]`` (optional) replaces that site's output by the given tensor
    instead (integrated gradients: an interpolated activation); its record then
    has that tensor as ``spliced`` and no code.
    """
    fixed = fixed or {}
    codes: dict[str, SiteCode] = {}

    def hook(name, coder, module, args, output):
        if name in fixed:
            written = output_tensor(name, output)
            if fixed[name].shape != written.shape:
                raise ValueError(f"sites[{name!r}]: the patched run's activation has shape {list(fixed[name].shape)}, "
                                 f"the clean run's {list(written.shape)}")
            codes[name] = SiteCode(None, None, None, None, spliced=fixed[name])
            return replace_output(output, fixed[name])
        codes[name], spliced = code_at(name, coder, args, output, gradient)
        return replace_output(output, spliced)

    with torch.enable_grad(), hooked(modules, coders, hook):
        output = call_model(model, inputs)
    require_all_ran(modules, codes)
    return output, codes
