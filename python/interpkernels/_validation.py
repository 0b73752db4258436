"""Argument checks shared by the public ops.

Every check runs on shapes, dtypes and devices only, before any kernel
launches, and raises an error that names the argument, what was expected and
what came: ``indices: expected int64 or int32 tensor of shape [N, k] on cpu,
got float32 [8, 3] on cpu``. Checks that read tensor data (index ranges,
latent_mask's count) live inside the ops, where torch.compile can trace around
them; the exceptions, :func:`require_indices_in_range` and
:func:`require_mask_keeps`, serve ``backend="torch"`` (which reaches no C++
op) and the Triton ops, and run as ``interpkernels.index_check()`` says: on the
host, or as a device-side assertion that needs no host sync.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from interpkernels import _C

FLOAT_DTYPES_ANY_DEVICE = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32)

_DTYPE_NAMES = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
    torch.int64: "int64",
    torch.int32: "int32",
}


def _dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def describe(tensor: torch.Tensor) -> str:
    return f"{_dtype_name(tensor.dtype)} {list(tensor.shape)} on {tensor.device}"


def supported_float_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """float64 is there for CPU gradchecks; the GPU kernels stop at float32."""
    if device.type == "cpu":
        return (torch.float64, *FLOAT_DTYPES_ANY_DEVICE)
    return FLOAT_DTYPES_ANY_DEVICE


def _names(dtypes: Sequence[torch.dtype]) -> str:
    names = [_dtype_name(d) for d in dtypes]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def require_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def require_float(name: str, tensor: object, device: torch.device | None = None) -> torch.Tensor:
    """A float tensor of a supported dtype for its device (or for `device`)."""
    tensor = require_tensor(name, tensor)
    dtypes = supported_float_dtypes(device or tensor.device)
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name}: expected a {_names(dtypes)} tensor, got {describe(tensor)}")
    return tensor


def require_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], expected_text: str) -> None:
    """`expected_text` spells the shape with its symbols, e.g. "[M, d] = [512, 64]"."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {expected_text}, got {describe(tensor)}")


def require_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != reference.device:
            raise ValueError(
                f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), got {describe(tensor)}"
            )


def require_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.dtype != reference.dtype:
            raise TypeError(
                f"{name}: expected dtype {_dtype_name(reference.dtype)} (the dtype of {reference_name}), "
                f"got {describe(tensor)}; cast the parameters, or run under torch.autocast"
            )


def require_indices(name: str, indices: object, values: torch.Tensor) -> torch.Tensor:
    """Integer indices shaped like `values` on its device; returned as int64."""
    indices = require_tensor(name, indices)
    if indices.dtype not in INDEX_DTYPES or indices.shape != values.shape or indices.device != values.device:
        raise (TypeError if indices.dtype not in INDEX_DTYPES else ValueError)(
            f"{name}: expected int64 or int32 tensor of shape {list(values.shape)} (the shape of values) "
            f"on {values.device}, got {describe(indices)}"
        )
    return indices.long()


def _check_syncs(device: torch.device) -> bool:
    """Whether data-dependent checks read their result on the host (interpkernels.index_check;
    the rule is the C++ checks', csrc/checks.cpp)."""
    return _C.index_check_syncs(device.type == "cuda")


_ASYNC_CHECK_HINT = _C.ASYNC_CHECK_HINT  # the C++ checks' ending of a device-side message


def require_indices_in_range(name: str, indices: torch.Tensor, num_latents: int) -> None:
    """IndexError unless every index lies in [0, num_latents): the kernels' own
    check (csrc/checks.cpp), one min/max, then a host read or a device-side
    assertion as interpkernels.index_check says. Skipped while torch.compile
    traces, where reading a value would break the graph."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    lowest, highest = torch.aminmax(indices)
    if not _check_syncs(indices.device):
        torch._assert_async((lowest >= 0) & (highest < num_latents),
                            f"{name}: expected every index in [0, {num_latents}){_ASYNC_CHECK_HINT}")
        return
    lowest, highest = torch.stack((lowest, highest)).tolist()  # both bounds in one copy
    if lowest < 0 or highest >= num_latents:
        raise IndexError(f"{name}: expected every index in [0, {num_latents}), got values from {lowest} to {highest}")


def require_mask_keeps(k: int, latent_mask: torch.Tensor) -> None:
    """ValueError unless latent_mask keeps at least k latents (checked as index_check says)."""
    if torch.compiler.is_compiling():
        return
    if not _check_syncs(latent_mask.device):
        torch._assert_async(latent_mask.sum() >= k,
                            f"k: expected at most as many latents as latent_mask keeps in, got {k}{_ASYNC_CHECK_HINT}")
        return
    kept = int(latent_mask.sum())
    if k > kept:
        raise ValueError(f"k: expected at most the {kept} latents latent_mask keeps in, got {k}")


def require_rows(name: str, tensor: torch.Tensor) -> None:
    """At least one row in a ``[..., d]`` tensor: a mean over no rows is NaN."""
    if tensor.dim() >= 1 and math.prod(tensor.shape[:-1]) == 0:
        raise ValueError(f"{name}: expected at least one row in a tensor of shape [..., d], got {describe(tensor)}")


def require_count(name: str, value: object, low: int, high: int, high_text: str) -> int:
    """An int in [low, high]; bools are refused although Python counts them as ints."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name}: expected {low} <= {name} <= {high_text} = {high}, got {value}")
    return value


def autocast_inputs(device: torch.device, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under torch.autocast, float inputs run in the autocast dtype, as for nn.Linear."""
    if not torch.is_autocast_enabled(device.type):
        return tensors
    dtype = torch.get_autocast_dtype(device.type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )
