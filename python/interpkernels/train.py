"""A training loop for the modules of interpkernels.nn.

    history = interpkernels.train.train(sae, batches, steps=2000)

`batches` is any iterable of activation batches: tensors ``[..., d]`` for an
SAE, ``(input, target)`` pairs for a transcoder; :func:`memmap_batches`
streams them from a raw array file on disk. Per step: forward (with AuxK on
the latents dead for `dead_after_tokens` tokens), backward, the decoder
gradient's component along each row removed, Adam, decoder rows back to unit
norm (the SAE-only steps). Dead-latent counting stays on the device: nothing
waits for the GPU except the progress line every `log_every` steps, which
also decides whether AuxK (a second encoder pass) runs until the next one.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interpkernels.nn import JumpReLUSAE, SparseCoder


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    auxk_loss: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)
    dead_latents: list[int] = field(default_factory=list)


class DeadLatentCounter:
    """Tokens since each latent last fired, updated on the device without a host sync."""

    def __init__(self, num_latents: int, device: torch.device):
        self.tokens_since_fired = torch.zeros(num_latents, dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        fired = torch.zeros_like(self.tokens_since_fired).scatter_reduce_(
            0, indices.reshape(-1), (values.reshape(-1) > 0).long(), reduce="amax")
        tokens = values.numel() // values.shape[-1]
        self.tokens_since_fired = torch.where(fired > 0, 0, self.tokens_since_fired + tokens)

    def dead_mask(self, dead_after_tokens: int) -> torch.Tensor:
        return self.tokens_since_fired >= dead_after_tokens


def default_learning_rate(num_latents: int) -> float:
    """2e-4 scaled by 1/sqrt(M / 2^14), the scaling law of Gao et al. 2024."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def memmap_batches(path: str | Path, d: int, batch_size: int, *, dtype=np.float32, device="cpu",
                   shuffle_seed: int | None = 0) -> Iterator[torch.Tensor]:
    """Endless batches ``[batch_size, d]`` from a raw ``[tokens, d]`` array file
    (numpy.memmap: only the rows of a batch are read).

    Raises ValueError at once (not at the first batch) when the file is not a
    whole number of rows of d values, or holds fewer than batch_size rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    row_bytes = d * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size % row_bytes:
        raise ValueError(f"{path}: {size} bytes is not a whole number of rows of d={d} {np.dtype(dtype).name} "
                         f"values ({row_bytes} bytes each); is d or dtype wrong?")
    rows = size // row_bytes
    if rows < batch_size:
        raise ValueError(f"{path}: holds {rows} rows of d={d}, fewer than batch_size={batch_size}")
    array = np.memmap(path, dtype=dtype, mode="r", shape=(rows, d))
    rng = np.random.default_rng(shuffle_seed)

    def batches() -> Iterator[torch.Tensor]:
        while True:
            starts = np.arange(0, rows - batch_size + 1, batch_size)
            if shuffle_seed is not None:
                rng.shuffle(starts)
            for start in starts:
                yield torch.from_numpy(np.array(array[start:start + batch_size])).to(device)

    return batches()


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)


def train(
    module: SparseCoder,
    batches: Iterable,
    *,
    steps: int,
    lr: float | None = None,
    dead_after_tokens: int = 10_000_000,
    auxk_coefficient: float = 1 / 32,
    sparsity_coefficient: float = 1e-3,
    normalize_decoder: bool = True,
    autocast_dtype: torch.dtype | None = None,
    log_every: int = 50,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1000,
    progress: bool = True,
) -> TrainHistory:
    """Train `module` for `steps` batches with Adam; returns the logged history.

    autocast_dtype: e.g. torch.bfloat16 to run the ops under torch.autocast
    (parameters stay float32). sparsity_coefficient weighs a JumpReLUSAE's L0.
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr or default_learning_rate(module.num_latents))
    device = next(module.parameters()).device
    dead = DeadLatentCounter(module.num_latents, device)
    history = TrainHistory()
    started, tokens_since_log = time.perf_counter(), 0
    batch_iter = iter(batches)
    for step in range(1, steps + 1):
        x, target = _split(next(batch_iter))
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            # AuxK costs a second encoder pass: run it once the last progress check
            # (the loop's only host sync) found dead latents.
            any_dead = bool(history.dead_latents) and history.dead_latents[-1] > 0
            out = module(x, target, dead_mask=dead.dead_mask(dead_after_tokens) if any_dead else None)
        loss = out.fvu + auxk_coefficient * out.auxk_loss
        if isinstance(module, JumpReLUSAE):
            loss = loss + sparsity_coefficient * out.l0
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if normalize_decoder and module.normalizes_decoder:
            module.remove_decoder_parallel_gradient_()
        optimizer.step()
        if normalize_decoder and module.normalizes_decoder:
            module.normalize_decoder_()
        dead.update(out.values.detach(), out.indices)
        tokens_since_log += x.numel() // x.shape[-1]

        if step % log_every == 0 or step == steps:
            elapsed = time.perf_counter() - started
            history.steps.append(step)
            history.fvu.append(out.fvu.item())
            history.auxk_loss.append(out.auxk_loss.item())
            history.l0.append(out.l0.item())
            history.tokens_per_second.append(tokens_since_log / elapsed)
            history.dead_latents.append(int(dead.dead_mask(dead_after_tokens).sum()))
            if progress:
                print(f"\rstep {step}/{steps}  fvu {history.fvu[-1]:.4f}  l0 {history.l0[-1]:.1f}  "
                      f"dead {history.dead_latents[-1]}  {history.tokens_per_second[-1]:,.0f} tok/s",
                      end="", file=sys.stderr, flush=True)
            started, tokens_since_log = time.perf_counter(), 0
        if checkpoint_dir is not None and step % checkpoint_every == 0:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            module.save(Path(checkpoint_dir) / f"step_{step}.safetensors")
    if progress:
        print(file=sys.stderr)
    return history
