"""Figures of a benchmark run: each implementation's median time against one
swept shape parameter (M, k or d), the others fixed, one figure per sweep."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from interpkernels.benchmarks.harness import Measurement

SWEPT = ("M", "k", "d")


def sweeps(measurements: list[Measurement]) -> dict[tuple, dict[str, list[tuple[int, float]]]]:
    """{(op, mode and fixed parameters, swept name): {impl: [(value, median ms), ...]}} for
    every parameter that takes at least two values while all else stays put."""
    found: dict[tuple, dict[str, list[tuple[int, float]]]] = {}
    for name in SWEPT:
        groups: dict[tuple, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
        for m in measurements:
            if name not in m.case.params:
                continue
            mode = m.case.label.split()[0]
            fixed = tuple(sorted((key, str(value)) for key, value in m.case.params.items() if key != name))
            groups[(m.case.op, mode, fixed, name)][m.impl].append((m.case.params[name], m.median_ms))
        for key, by_impl in groups.items():
            if len({value for points in by_impl.values() for value, _ in points}) >= 2:
                found[key] = {impl: sorted(points) for impl, points in by_impl.items()}
    return found


def write_plots(measurements: list[Measurement], directory: Path, stem: str) -> list[Path]:
    """One PNG per sweep (log-log axes), named <stem>-<op>-<mode>-vs-<name>[-n].png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for (op, mode, fixed, name), by_impl in sweeps(measurements).items():
        figure, axes = plt.subplots(figsize=(6, 4))
        for impl, points in by_impl.items():
            axes.plot([value for value, _ in points], [ms for _, ms in points], marker="o", label=impl)
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(name)
        axes.set_ylabel("median time (ms)")
        axes.set_title(f"{op} {mode}, " + ", ".join(f"{key}={value}" for key, value in fixed).replace("torch.", ""),
                       fontsize=8)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = directory / f"{stem}-{op}-{mode.replace('+', '_')}-vs-{name}.png"
        suffix = 1
        while path in written:
            suffix += 1
            path = directory / f"{stem}-{op}-{mode.replace('+', '_')}-vs-{name}-{suffix}.png"
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written
