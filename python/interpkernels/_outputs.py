"""Allocation of the Triton ops' outputs (the C++ ops use csrc/outputs.h).

With INTERPKERNELS_POISON_OUTPUTS=1 (read at import; the test suite sets it)
outputs start as NaN (floating types) or the lowest int64 instead of
uninitialised memory, so an element a kernel fails to write fails a test.
"""

from __future__ import annotations

import os

import torch

POISON_OUTPUTS = os.environ.get("INTERPKERNELS_POISON_OUTPUTS") == "1"


def new_output(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if not POISON_OUTPUTS:
        return torch.empty(*shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, dtype=dtype, device=device)
