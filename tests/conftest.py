import contextlib
import io
import os
import pathlib
import sys

import pytest
import torch
from devices import TRITON_DEVICE, op_targets

# A stable inductor cache makes the torch.compile tests ~3x faster on re-runs.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR", str(pathlib.Path(__file__).resolve().parent.parent / ".inductor-cache")
)
# Without a GPU the Triton kernels run under the interpreter, on CPU tensors.
# @triton.jit and interpkernels' backend table read this once, so it is set first.
if TRITON_DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
# Every op's outputs start as NaN (or the lowest int64), so an element a kernel
# fails to write fails the test comparing it (csrc/outputs.h).
os.environ["INTERPKERNELS_POISON_OUTPUTS"] = "1"

import interpkernels  # noqa: E402,F401  (registers the ops)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def triton_as_on_gpu():
    """Two bfloat16 bugs of the Triton interpreter (3.6 to 3.9), fixed while a
    test module runs: it truncates float32 -> bfloat16 where GPUs round to
    nearest even (alone enough to double a bf16 error), and its tl.dot
    multiplies bfloat16 bit patterns as integers. Nothing to do on a GPU."""
    pytest.importorskip("triton")
    if TRITON_DEVICE == "cuda":
        yield TRITON_DEVICE
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def rounding_cast(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.tensor(src.data).to(torch.bfloat16).view(torch.int16).numpy().view("uint16")
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return cast_impl(self, src, dst_type)

    def to_float32(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        exact = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None).view("float32")
        return interpreter.TensorHandle(exact, tl.float32)

    def float32_dot(self, a, b, *args):
        return create_dot(self, to_float32(a), to_float32(b), *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(builder, "cast_impl", rounding_cast)
        patch.setattr(builder, "create_dot", float32_dot)
        yield TRITON_DEVICE


@contextlib.contextmanager
def cpu_kernels_at(isa: str | None):
    """The C++ CPU kernels at this instruction-set level meanwhile (None: unchanged)."""
    previous = interpkernels.cpu_isa()
    if isa is not None:
        interpkernels.set_cpu_isa(isa)
    try:
        yield
    finally:
        interpkernels.set_cpu_isa(previous)


@pytest.fixture(params=interpkernels.supported_cpu_isas())
def cpu_isa(request):
    """Runs a test once per instruction-set level this CPU has (AVX-512, AVX2,
    baseline): every level must give the same results, and CI machines differ."""
    with cpu_kernels_at(request.param):
        yield request.param


@pytest.fixture(params=op_targets(), ids=str)
def target(request):
    """Runs an op test on every (device, backend) here (devices.op_targets),
    the CPU kernels once per instruction-set level."""
    with cpu_kernels_at(request.param.cpu_isa):
        yield request.param


# ---- progress displays (train, decomposition) ----

class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def fake_terminal(monkeypatch):
    """Call it in the test body (pytest's capture resets sys.stderr after fixtures run):
    sys.stderr becomes a terminal (isatty() is True) whose text the test reads back."""
    def install() -> io.StringIO:
        terminal = _FakeTerminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        return terminal
    return install
