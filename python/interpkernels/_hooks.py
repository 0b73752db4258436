"""Forward hooks on named submodules for the span of a ``with`` block.

Harvesting (activations.py), attribution (attribution/sites.py) and parameter
decomposition (decomposition/) all read or replace submodule outputs this way;
this private module is the one place they share, so none of those families
depends on another.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from torch import nn

# torch's forward-hook signature: hook(module, args, output); a return value other
# than None becomes the module's output.
ForwardHook = Callable[[nn.Module, tuple, object], object]


@contextmanager
def forward_hooks(modules: nn.Module | Mapping[str, nn.Module], hooks: Mapping[str, ForwardHook]) -> Iterator[None]:
    """Registers ``hooks[name]`` as a forward hook on the submodule ``name`` (of a
    model: ``modules.get_submodule(name)``; of a mapping already resolved:
    ``modules[name]``) and removes every one on exit, whatever happens inside
    (an unknown name raises before any hook stays behind)."""
    submodule = modules.get_submodule if isinstance(modules, nn.Module) else modules.__getitem__
    handles = []
    try:
        for name, hook in hooks.items():
            handles.append(submodule(name).register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
