"""The fused encoder's Triton kernels compile for Hopper (sm_90) without a GPU.

The interpreter the CPU tests run them under accepts programs the GPU
compiler rejects (layouts, tl.dot operand types, int64 shifts), so each of
the launcher's configurations is also compiled to a cubin, in a process
without TRITON_INTERPRET (tests/triton_sm90.py). That script also fails when a
16-bit encoder tile for k <= 256 multiplies without wgmma, or any encoder tile
spills registers."""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
def test_encoder_kernels_compile_for_sm90():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    script = pathlib.Path(__file__).with_name("triton_sm90.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=environment,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    compiled = done.stdout.count(": sm_90 cubin")
    assert compiled > 15 and f"{compiled} kernels compiled" in done.stdout
