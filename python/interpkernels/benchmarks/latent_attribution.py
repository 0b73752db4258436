"""latent_attribution benchmarks: ours against the dense autograd formulation
feature-circuits uses (both codes made dense [N, M], f_clean with
requires_grad, the metric's backward through x_hat = f @ W_dec gives dm/df
[N, M], attr = (f_p - f_c) * dm/df), and against the dense reference."""

from __future__ import annotations

import torch

import interpkernels
from interpkernels import reference
from interpkernels.benchmarks.harness import Case


def dense_autograd(clean_values, clean_indices, patched_values, patched_indices, grad, W_dec, reduce):
    """feature-circuits' way: dm/df by autograd through the dense decoder, then (f_p - f_c) * dm/df.
    Latents outside a token's two supports have f_p = f_c = 0 and score 0."""
    M = W_dec.shape[0]
    f_clean = reference.densify(clean_values, clean_indices, M).requires_grad_()
    f_patched = reference.densify(patched_values, patched_indices, M)
    with torch.enable_grad():
        metric = ((f_clean @ W_dec) * grad).sum()  # dm/dx_hat = grad at the SAE site
        (grad_f,) = torch.autograd.grad(metric, f_clean)
    attr = (f_patched - f_clean.detach()) * grad_f
    return attr.sum(0) if reduce == "sum" else attr.abs().mean(0)


def make_inputs(device, dtype, N, d, M, k, overlap):
    """Clean and patched TopK codes sharing `overlap` of their k latents per row."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    order = torch.rand(N, M, generator=generator).topk(2 * k, dim=-1).indices  # distinct per row
    shared = int(overlap * k)
    clean_indices = order[:, :k]
    patched_indices = torch.cat([order[:, :shared], order[:, k:2 * k - shared]], dim=1)
    clean_values = torch.rand(N, k, generator=generator)
    patched_values = torch.rand(N, k, generator=generator)
    grad = torch.randn(N, d, generator=generator)
    W_dec = torch.randn(M, d, generator=generator) / d**0.5
    return [t.to(device, dtype) if t.is_floating_point() else t.to(device)
            for t in (clean_values, clean_indices, patched_values, patched_indices, grad, W_dec)]


def case(reduce: str, dtype: torch.dtype, **shape) -> Case:
    def make(device):
        inputs = make_inputs(device, dtype, **shape)
        return {
            "interpkernels": lambda: interpkernels.latent_attribution(*inputs, reduce=reduce),
            "dense autograd (feature-circuits)": lambda: dense_autograd(*inputs, reduce),
            "reference (dense)": lambda: reference.latent_attribution(*inputs, reduce=reduce),
        }

    label = " ".join([f"reduce={reduce}", *(f"{key}={value}" for key, value in shape.items()),
                      str(dtype).removeprefix("torch.")])
    return Case("latent_attribution", label, dict(shape, reduce=reduce, dtype=str(dtype)), make,
                "dense autograd (feature-circuits)")


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case("sum", torch.float32, N=128, d=64, M=1024, k=8, overlap=0.5)]
    return [
        case("sum", torch.float32, N=4096, d=768, M=32768, k=64, overlap=0.5),
        case("mean_abs", torch.float32, N=4096, d=768, M=32768, k=64, overlap=0.5),
    ]


if __name__ == "__main__":
    from interpkernels.benchmarks.harness import format_table, run_cases

    print(format_table(run_cases(cases(), torch.device("cpu"), repeats=5)))
