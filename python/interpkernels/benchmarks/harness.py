"""Side-by-side timing and peak memory of several implementations of one op.

Every implementation of a case runs in the same process on the same inputs,
interleaved repeat by repeat so that machine drift hits all of them alike.
Reported: median and spread (min, max) over repeats, peak extra memory of one
call, speed-up relative to the case's baseline (baseline time / time), and,
for cases that state their cost, the fraction of the floor reached: the
floor is the case's GEMM FLOPs at this device's measured matmul rate or its
bytes at the measured copy bandwidth, whichever takes longer.

On CUDA one repeat is `triton.testing.do_bench`'s median (many launches,
L2 flushed between them); on the CPU it is one call timed by the wall clock.
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Case:
    """One shape of one op; `make` builds inputs and returns {name: no-arg callable}."""

    op: str
    label: str
    params: dict
    make: Callable[[torch.device], dict[str, Callable[[], object]]]
    baseline: str
    # (GEMM FLOPs, bytes that must move) of one call, for the floor; None: not stated.
    cost: tuple[float, float] | None = None


def op_case(op: str, mode: str, shape: dict, dtype: torch.dtype, implementations: dict[str, Callable],
            baseline: str, make_inputs: Callable, call: Callable,
            cost: tuple[float, float] | None = None) -> Case:
    """A case timing each implementation of one op on the same inputs.

    make_inputs(device, dtype, **shape) -> (inputs, grad_output); call(impl,
    inputs) -> the output. mode "forward" runs under no_grad; "fwd+bwd" adds
    the gradients of every float input for grad_output. cost: (GEMM FLOPs,
    bytes) of one call in this mode, for the floor.
    """
    if mode not in ("forward", "fwd+bwd"):
        raise ValueError(f"mode: expected 'forward' or 'fwd+bwd', got {mode!r}")

    def make(device):
        inputs, grad_output = make_inputs(device, dtype, **shape)
        leaves = [t.requires_grad_() for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]

        def bind(impl):
            def forward():
                with torch.no_grad():
                    return call(impl, inputs)

            def training():
                return torch.autograd.grad(call(impl, inputs), leaves, grad_output)

            return forward if mode == "forward" else training

        return {name: bind(impl) for name, impl in implementations.items()}

    label = " ".join([mode, *(f"{key}={value}" for key, value in shape.items()), str(dtype).removeprefix("torch.")])
    return Case(op, label, dict(shape, dtype=str(dtype)), make, baseline, cost)


@dataclass
class Measurement:
    case: Case
    impl: str
    times_ms: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    floor_ms: float | None = None

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def floor_fraction(self) -> float | None:
        return None if self.floor_ms is None else self.floor_ms / self.median_ms


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_memory_tracking() -> bool:
    """Peak resident memory is read from /proc after resetting it (Linux).

    glibc otherwise keeps freed blocks and raises its mmap threshold over
    time, which would hide allocations: fix the threshold so every large
    block is mapped on allocation and unmapped on free."""
    if not (sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def peak_extra_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory above what was in use before one call of fn (outputs included)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak / 2**20
    if not _cpu_memory_tracking():
        return None
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    result = fn()
    peak = _status_kib("VmHWM") - before
    del result
    return peak / 1024


def time_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """One repeat: do_bench's median on CUDA, one wall-clock call elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return (time.perf_counter() - start) * 1e3


@dataclass(frozen=True)
class FloorRates:
    """What this device sustains: matmul FLOP/s per dtype, and copy bytes/s (read + write)."""

    matmul_flops: dict
    copy_bytes: float

    def floor_ms(self, cost: tuple[float, float], dtype: str) -> float:
        flops, moved = cost
        return 1e3 * max(flops / self.matmul_flops[dtype], moved / self.copy_bytes)


def measure_floor_rates(device: torch.device, dtypes: set[str], repeats: int = 3) -> FloorRates:
    """The best of a few square matmuls per dtype and of a few large copies."""
    size = 8192 if device.type == "cuda" else 1024
    rates = {}
    for name in sorted(dtypes):
        dtype = getattr(torch, name.removeprefix("torch."))
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        best = min(time_call_ms(lambda: a @ b, device) for _ in range(repeats))
        rates[name] = 2 * size**3 / (best / 1e3)
    source = torch.empty((1 << 30 if device.type == "cuda" else 1 << 27) // 4, device=device)
    target = torch.empty_like(source)
    best = min(time_call_ms(lambda: target.copy_(source), device) for _ in range(repeats))
    return FloorRates(rates, 2 * source.numel() * 4 / (best / 1e3))


def run_cases(cases: list[Case], device: torch.device, repeats: int, log=print) -> list[Measurement]:
    measurements: list[Measurement] = []
    rates = None
    if any(case.cost is not None for case in cases):
        rates = measure_floor_rates(device, {case.params["dtype"] for case in cases if case.cost is not None})
        log("floor rates: " + ", ".join(f"{name.removeprefix('torch.')} matmul {rate / 1e12:.2f} TFLOP/s"
                                        for name, rate in rates.matmul_flops.items())
            + f", copy {rates.copy_bytes / 1e9:.1f} GB/s")
    for number, case in enumerate(cases, 1):
        log(f"[{number}/{len(cases)}] {case.op} {case.label}: building inputs")
        impls = case.make(device)
        floor_ms = rates.floor_ms(case.cost, case.params["dtype"]) if case.cost is not None else None
        results = {name: Measurement(case, name, floor_ms=floor_ms) for name in impls}
        for name, fn in impls.items():  # warm-up, then memory of one call
            fn()
            _synchronize(device)
            results[name].peak_mib = peak_extra_mib(fn, device)
        for repeat in range(repeats):
            for name, fn in impls.items():
                results[name].times_ms.append(time_call_ms(fn, device))
            log(f"    repeat {repeat + 1}/{repeats}: "
                + ", ".join(f"{n} {m.times_ms[-1]:.1f} ms" for n, m in results.items()))
        measurements.extend(results.values())
        del impls
        gc.collect()
    return measurements


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {torch.get_num_threads()} threads"


def current_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("INTERPKERNELS_COMMIT", "unknown")


def speedup(m: Measurement, by_case: dict) -> float:
    return by_case[(id(m.case), m.case.baseline)].median_ms / m.median_ms


def format_table(measurements: list[Measurement]) -> str:
    by_case = {(id(m.case), m.impl): m for m in measurements}
    header = ("op", "case", "impl", "median ms", "min-max ms", "peak MiB", "speed-up vs baseline", "of floor")
    rows = [header]
    for m in measurements:
        baseline_mark = " (baseline)" if m.impl == m.case.baseline else ""
        rows.append((
            m.case.op, m.case.label, m.impl + baseline_mark, f"{m.median_ms:.1f}",
            f"{min(m.times_ms):.1f}-{max(m.times_ms):.1f}",
            "n/a" if m.peak_mib is None else f"{m.peak_mib:.1f}",
            f"{speedup(m, by_case):.2f}x",
            "" if m.floor_fraction is None else f"{100 * m.floor_fraction:.0f}%",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_csv(measurements: list[Measurement], path: Path, device: torch.device) -> None:
    by_case = {(id(m.case), m.impl): m for m in measurements}
    meta = {
        "machine": machine_description(device),
        "device": str(device),
        "torch": torch.__version__,
        "commit": current_commit(),
        "date": datetime.date.today().isoformat(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*meta, "op", "case", "impl", "baseline", "median_ms", "min_ms", "max_ms", "repeats",
                         "peak_extra_mib", "speedup_vs_baseline", "floor_ms", "floor_fraction"])
        for m in measurements:
            writer.writerow([*meta.values(), m.case.op, m.case.label, m.impl, m.case.baseline,
                             f"{m.median_ms:.3f}", f"{min(m.times_ms):.3f}", f"{max(m.times_ms):.3f}",
                             len(m.times_ms), "" if m.peak_mib is None else f"{m.peak_mib:.1f}",
                             f"{speedup(m, by_case):.3f}", "" if m.floor_ms is None else f"{m.floor_ms:.3f}",
                             "" if m.floor_fraction is None else f"{m.floor_fraction:.3f}"])
