"""Where the op tests run: every (device, backend) this machine has.

Without a GPU the Triton kernels run on CPU tensors under the Triton
interpreter (conftest sets TRITON_INTERPRET=1 before anything imports triton);
with one, on the GPU.
"""

from dataclasses import dataclass

import pytest
import torch

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Target:
    """A device and the backend= the ops get there; cpu_isa for the C++ CPU kernels."""

    device: str
    backend: str
    cpu_isa: str | None = None

    def __str__(self) -> str:
        return "-".join(filter(None, (self.device, self.backend, self.cpu_isa)))

    def skip_unless_runs(self, dtype: torch.dtype) -> None:
        """The GPU kernels run float32, bfloat16 and float16; float64 is for the CPU oracles and gradchecks."""
        if self.device == "cuda" and dtype == torch.float64:
            pytest.skip("the GPU kernels take float32, bfloat16 and float16")

    def put_args(self, args: tuple) -> tuple:
        """An op's arguments on this target's device, tensors as fresh leaves that keep requires_grad."""
        return tuple(a.detach().to(self.device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                     for a in args)

    def op(self, name: str):
        """The registered op this target's backend runs (the _triton one for "triton")."""
        from interpkernels.ops._kernels import kernels

        return getattr(kernels(self.backend), name)

    def put(self, *tensors):
        """The tensors on this target's device (None stays None)."""
        moved = tuple(None if t is None else t.to(self.device) for t in tensors)
        return moved if len(moved) > 1 else moved[0]


def op_targets() -> list[Target]:
    """The C++ CPU kernels at every instruction-set level this CPU runs; with a
    GPU, also CUDA tensors through each GPU backend and through "auto" (which
    picks among them by op and k). Triton under the interpreter is left to the
    Triton tests, at their small shapes."""
    import interpkernels

    targets = [Target("cpu", "cpu", isa) for isa in interpkernels.supported_cpu_isas()]
    if torch.cuda.is_available():
        usable = interpkernels.build_info()["backends"]
        targets += [Target("cuda", backend) for backend in ("cuda", "triton") if backend in usable]
        targets.append(Target("cuda", "auto"))
    return targets


def backends_and_devices():
    """(backend, device) pairs topk_encode runs on here: the C++ kernels on CPU
    (and on CUDA when compiled and a GPU is visible), the dense reference, and
    Triton on TRITON_DEVICE when installed."""
    import interpkernels

    usable = interpkernels.build_info()["backends"]
    pairs = [("cpu", "cpu"), ("torch", "cpu")]
    if "cuda" in usable:
        pairs.append(("cuda", "cuda"))
    if "triton" in usable:
        pairs.append(("triton", TRITON_DEVICE))
    return pairs
