"""Drop-in adapters that run popular SAE libraries on interpkernels' fused ops.

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

import functools
import importlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["accelerate", "revert"]

_OPTIONS_ATTR = "_interpkernels_options"
_CODE_ATTR = "_interpkernels_sparse_code"
_MISSING = object()
_SUBMODULES = ("sparsify", "saelens", "dictionary_learning")


def default_options(materialize_pre_acts: bool = False) -> dict[str, Any]:
    if not isinstance(materialize_pre_acts, bool):
        raise TypeError(f"materialize_pre_acts: expected a bool, got {type(materialize_pre_acts).__name__}")
    return {"materialize_pre_acts": materialize_pre_acts}


def options_of(obj: object) -> dict[str, Any] | None:
    """The adapter options in force for ``obj``: its own (set by ``accelerate``,
    or ``False`` after ``revert``), else its class's (set by ``apply_to_*``)."""
    options = getattr(obj, _OPTIONS_ATTR, None)
    return options or None


class Patcher:
    """Wraps methods of a library's classes so that each call takes the fused
    path when :func:`options_of` the receiver says so, and the library's own
    method otherwise. Wrappers are installed once, removed by :meth:`uninstall`."""

    def __init__(self, library: str):
        self.library = library
        self._installed: dict[tuple[type, str], Any] = {}
        self._enabled_classes: list[type] = []

    def install(self, cls: type, name: str, fast: Callable[..., Any]) -> None:
        """``fast(obj, original, options, *args, **kwargs)``; ``original`` is the
        library's method bound to ``obj`` (for the cases it must fall back to)."""
        key = (cls, name)
        if key in self._installed:
            return
        previous = cls.__dict__.get(name, _MISSING)
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapper(obj, *args, **kwargs):
            options = options_of(obj)
            if options is None:
                return original(obj, *args, **kwargs)
            return fast(obj, original.__get__(obj), options, *args, **kwargs)

        wrapper._interpkernels_original = original  # type: ignore[attr-defined]
        setattr(cls, name, wrapper)
        self._installed[key] = previous

    def enable_class(self, cls: type, options: dict[str, Any]) -> None:
        setattr(cls, _OPTIONS_ATTR, dict(options))
        if cls not in self._enabled_classes:
            self._enabled_classes.append(cls)

    def uninstall(self) -> None:
        for (cls, name), previous in self._installed.items():
            if previous is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, previous)
        self._installed.clear()
        for cls in self._enabled_classes:
            if _OPTIONS_ATTR in cls.__dict__:
                delattr(cls, _OPTIONS_ATTR)
        self._enabled_classes.clear()


def set_instance_options(obj: object, options: dict[str, Any] | bool) -> None:
    # Straight into __dict__: nn.Module.__setattr__ would do the same for a
    # plain value, and a non-Module object has no __setattr__ of note.
    obj.__dict__[_OPTIONS_ATTR] = options


def original_method(cls: type, name: str) -> Callable[..., Any]:
    """The library's function behind a (possibly wrapped) class attribute."""
    method = getattr(cls, name)
    return getattr(method, "_interpkernels_original", method)


def not_overridden(obj: object, base: type, *names: str) -> bool:
    """True when ``obj``'s class resolves each method to the one on ``base``
    (a subclass overriding any of them gets the library's code)."""
    cls = type(obj)
    return all(getattr(cls, name) is getattr(base, name) for name in names)


# ---------------------------------------------------------------------------
# Dense activations that remember their sparse code.


class SparseCode:
    __slots__ = ("values", "indices", "version", "requires_grad")

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, version: int, requires_grad: bool):
        self.values, self.indices, self.version, self.requires_grad = values, indices, version, requires_grad


def dense_from_code(values: torch.Tensor, indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    """``[..., M]`` zeros with ``values`` scattered at ``indices`` (out of place,
    differentiable in ``values``)."""
    zeros = values.new_zeros(*values.shape[:-1], num_latents)
    return zeros.scatter(-1, indices, values)


def tag_with_code(dense: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Attach the code that exactly describes ``dense``'s nonzeros."""
    try:
        setattr(dense, _CODE_ATTR, SparseCode(values, indices, dense._version, dense.requires_grad))
    except Exception:  # tensors that take no attributes (some subclasses, tracing)
        pass
    return dense


def code_of(dense: object) -> SparseCode | None:
    """The code of a tensor made by :func:`tag_with_code`, if decoding from it is
    indistinguishable from decoding the dense tensor: not modified in place,
    ``requires_grad`` unchanged (so no leaf made of it afterwards), and no
    ``retain_grad`` / tensor hook that would expect its gradient."""
    if not isinstance(dense, torch.Tensor):
        return None
    code = getattr(dense, _CODE_ATTR, None)
    if not isinstance(code, SparseCode):
        return None
    try:
        if (
            dense._version != code.version
            or dense.requires_grad != code.requires_grad
            or dense.retains_grad
            or dense._backward_hooks
        ):
            return None
    except Exception:
        return None
    return code


def module_has_hooks(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` could do anything but return its input (for
    hook points: TransformerLens hooks are forward hooks)."""
    from torch.nn.modules import module as module_globals

    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or module_globals._global_forward_hooks
        or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks
        or module_globals._global_backward_pre_hooks
    )


def autocast_disabled(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------
# Library-agnostic entry points.


def _library_of(obj: object) -> str:
    for cls in type(obj).__mro__:
        root = cls.__module__.split(".")[0]
        if root == "sparsify":
            return "sparsify"
        if root == "sae_lens":
            return "saelens"
        if root == "dictionary_learning":
            return "dictionary_learning"
    raise TypeError(
        f"accelerate: expected a sparsify SparseCoder, a SAELens TopK SAE or a dictionary_learning "
        f"AutoEncoderTopK / TopKTrainer, got {type(obj).__module__}.{type(obj).__qualname__}"
    )


def accelerate(obj: Any, **options: Any) -> Any:
    """Patch one object of a supported library (detected from its class);
    returns it. Options as the library module's ``accelerate``."""
    return importlib.import_module(f"{__name__}.{_library_of(obj)}").accelerate(obj, **options)


def revert(obj: Any) -> Any:
    """Make ``obj`` run its library's own code again, whatever the class patches."""
    return importlib.import_module(f"{__name__}.{_library_of(obj)}").revert(obj)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
