"""error_attribution benchmarks: ours against the reference (torch's
elementwise difference, product and row sum, which write two [N, d] temporaries)."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case, op_case


def make_inputs(device, dtype, N, d):
    generator = torch.Generator(device="cpu").manual_seed(0)
    clean, patched, grad = (torch.randn(N, d, generator=generator).to(device, dtype) for _ in range(3))
    return (clean, patched, grad), torch.randn(N, generator=generator).to(device)


def call(attribution, inputs):
    return attribution(*inputs)


def case(mode: str, dtype: torch.dtype, **shape) -> Case:
    return op_case("error_attribution", mode, shape, dtype,
                   {"interpkernels": interpkernels.error_attribution, "reference": reference.error_attribution},
                   "reference", make_inputs, call)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("forward", torch.float32, N=256, d=64)]
    return [case("forward", torch.float32, N=4096, d=768), case("forward", torch.float32, N=65536, d=768)]


if __name__ == "__main__":
    from interpkernels.benchmarks.harness import format_table, run_cases

    print(format_table(run_cases(cases(), torch.device("cpu"), repeats=5)))
