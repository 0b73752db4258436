"""feature_edges benchmarks: ours (pruned per destination where computed)
against the reference, which gathers both sides' rows ([N, k, d] each),
computes every token's [k_dst, k_src] block by a batched matmul, and prunes
it by sorting -- what one writes in PyTorch. (The fully dense way, virtual
weights W_enc_dst @ W_dec_src^T of [M_dst, M_src], is 4 GiB at M = 32768 and
is not run.)"""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case


def make_inputs(device, dtype, N, d, M, k):
    generator = torch.Generator(device="cpu").manual_seed(0)
    src_values = torch.rand(N, k, generator=generator)
    src_indices = torch.rand(N, M, generator=generator).topk(k, dim=-1).indices  # distinct per row
    dst_indices = torch.rand(N, M, generator=generator).topk(k, dim=-1).indices
    W_dec_src = torch.randn(M, d, generator=generator) / d**0.5
    W_enc_dst = torch.randn(M, d, generator=generator) / d**0.5
    dst_scale = torch.randn(N, k, generator=generator)
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device)
            for t in (src_values, src_indices, W_dec_src, dst_indices, W_enc_dst, dst_scale)]


def case(dtype: torch.dtype, top_k: int | None, threshold: float | None, reduce: str, **shape) -> Case:
    pruning = dict(top_k=top_k, threshold=threshold, reduce=reduce)

    def make(device):
        inputs = make_inputs(device, dtype, **shape)
        return {
            "interpkernels": lambda: interpkernels.feature_edges(*inputs, **pruning),
            "reference (gathered bmm + sort)": lambda: reference.feature_edges(*inputs, **pruning),
        }

    label = " ".join([*(f"{key}={value}" for key, value in {**pruning, **shape}.items()),
                      str(dtype).removeprefix("torch.")])
    return Case("feature_edges", label, dict(shape, **pruning, dtype=str(dtype)), make,
                "reference (gathered bmm + sort)")


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(torch.float32, 4, None, "sum", N=64, d=32, M=512, k=8)]
    return [
        case(torch.float32, 8, None, "sum", N=4096, d=768, M=32768, k=64),
        case(torch.float32, None, 0.05, "none", N=4096, d=768, M=32768, k=64),
    ]


if __name__ == "__main__":
    from interpkernels.benchmarks.harness import format_table, run_cases

    print(format_table(run_cases(cases(), torch.device("cpu"), repeats=5)))
