"""interpkernels._hooks.forward_hooks: the one hook helper harvest, attribution and decomposition share."""

import pytest
import torch
from torch import nn

from interpkernels._hooks import forward_hooks


def two_layers():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_a_hook_can_read_and_replace_outputs_and_is_gone_after():
    model, x = two_layers(), torch.randn(5, 3)
    seen = {}
    replacement = torch.full((5, 4), 0.5)
    hooks = {"0": lambda module, args, output: replacement, "1": lambda module, args, output: seen.setdefault("1", output)}
    with forward_hooks(model, hooks):
        hooked = model(x)
    assert torch.equal(seen["1"], model[1](replacement)) and torch.equal(hooked, seen["1"])
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
    assert not torch.equal(model(x), hooked)


def test_resolved_modules_take_the_same_hooks():
    model, x = two_layers(), torch.randn(5, 3)
    with forward_hooks({"first": model[0]}, {"first": lambda module, args, output: torch.zeros(5, 4)}):
        assert torch.equal(model(x), model[1](torch.zeros(5, 4)))
    assert not model[0]._forward_hooks


def test_hooks_are_removed_whatever_happens():
    model = two_layers()
    with pytest.raises(RuntimeError, match="inside"):
        with forward_hooks(model, {"0": lambda *hook_args: None, "1": lambda *hook_args: None}):
            raise RuntimeError("inside")
    # An unknown name after a known one: the known one's hook does not stay behind.
    with pytest.raises(AttributeError, match="missing"):
        with forward_hooks(model, {"0": lambda *hook_args: None, "missing": lambda *hook_args: None}):
            pass
    assert not model[0]._forward_hooks and not model[1]._forward_hooks
