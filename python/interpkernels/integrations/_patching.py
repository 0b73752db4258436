"""The patching toolkit the three adapters share: per-instance options, class
patches that can be reverted, dense codes that remember their sparse code, and
the library-agnostic ``accelerate`` / ``revert`` (see the package docstring)."""

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
PACKAGE = "interpkernels.integrations"


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
    return importlib.import_module(f"{PACKAGE}.{_library_of(obj)}").accelerate(obj, **options)


def revert(obj: Any) -> Any:
    """Make ``obj`` run its library's own code again, whatever the class patches."""
    return importlib.import_module(f"{PACKAGE}.{_library_of(obj)}").revert(obj)
