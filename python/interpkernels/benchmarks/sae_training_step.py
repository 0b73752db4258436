"""A whole TopK SAE training step (encode, decode, FVU/MSE loss, backward,
Adam) of interpkernels.nn.TopKSAE against the SAEs researchers train today:
EleutherAI sparsify's SparseCoder (with and without our adapter), SAELens'
TopK training SAE and dictionary_learning's AutoEncoderTopK, plus TopKSAE on
the dense reference ops. Same shapes, dtype and inputs, one run. Peers that
are not installed (setup_helpers/peer-requirements.txt) are left out.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable

import torch

from interpkernels.benchmarks.harness import Case
from interpkernels.nn import TopKSAE

BASELINE = "sparsify SparseCoder"


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _step(module: torch.nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(x)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return run


def _normalized_mse(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (reconstruction - x).square().sum() / (x - x.mean(0)).square().sum()


def _peer_steps(d: int, M: int, k: int, x: torch.Tensor) -> dict[str, Callable]:
    steps = {}
    device = x.device
    if _installed("sparsify"):
        if device.type == "cpu":  # sparsify picks its Triton decoder whenever triton imports, GPU or not
            os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")
        from sparsify import SparseCoder, SparseCoderConfig

        from interpkernels.integrations import sparsify as adapter

        plain = SparseCoder(d, SparseCoderConfig(num_latents=M, k=k), device=device)
        steps[BASELINE] = _step(plain, lambda x: plain(x).fvu, x)
        patched = adapter.accelerate(SparseCoder(d, SparseCoderConfig(num_latents=M, k=k), device=device))
        steps["sparsify + interpkernels adapter"] = _step(patched, lambda x: patched(x).fvu, x)
    if _installed("sae_lens"):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        saelens = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=M, k=k, device=str(device)))
        steps["SAELens TopKTrainingSAE"] = _step(saelens, lambda x: _normalized_mse(saelens(x), x), x)
    if _installed("dictionary_learning"):
        from dictionary_learning.trainers.top_k import AutoEncoderTopK

        nnsight = sys.modules.get("nnsight")  # imported with dictionary_learning; it patches torch globally
        if nnsight is not None and hasattr(nnsight, "DEFAULT_PATCHER"):
            nnsight.DEFAULT_PATCHER.__exit__(None, None, None)
        autoencoder = AutoEncoderTopK(d, M, k).to(device)
        steps["dictionary_learning AutoEncoderTopK"] = _step(
            autoencoder, lambda x: _normalized_mse(autoencoder(x), x), x)
    return steps


def case(N: int, d: int, M: int, k: int, dtype: torch.dtype = torch.float32) -> Case:
    def make(device):
        x = torch.randn(N, d, generator=torch.Generator().manual_seed(0)).to(device, dtype)
        ours = TopKSAE(d, M, k, seed=0).to(device, dtype)
        reference_ops = TopKSAE(d, M, k, seed=0).to(device, dtype)
        reference_ops.backend = "torch"
        steps = {
            "interpkernels TopKSAE": _step(ours, lambda x: ours(x).fvu, x),
            "TopKSAE on reference ops": _step(reference_ops, lambda x: reference_ops(x).fvu, x),
        }
        return {**steps, **_peer_steps(d, M, k, x)} if dtype == torch.float32 else steps

    baseline = BASELINE if _installed("sparsify") else "TopKSAE on reference ops"
    label = f"step N={N} d={d} M={M} k={k} {str(dtype).removeprefix('torch.')}"
    return Case("sae_training_step", label, dict(N=N, d=d, M=M, k=k, dtype=str(dtype)), make, baseline)


def cases(quick: bool = False) -> list[Case]:
    if quick:
        return [case(256, 64, 1024, 8)]
    return [case(4096, 768, 16384, 32)]
