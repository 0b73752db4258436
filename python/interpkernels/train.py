"""A training loop for the modules of interpkernels.nn.

    history = interpkernels.train.train(sae, batches, steps=2000)

`batches` is any iterable of activation batches: tensors ``[..., d]`` for an
SAE, ``(input, target)`` pairs for a transcoder; :func:`memmap_batches`
streams them from a raw array file on disk. Per step: forward (with AuxK on
the latents dead for `dead_after_tokens` tokens), backward, the decoder
gradient's component along each row removed, Adam, decoder rows back to unit
norm (the SAE-only steps). Dead-latent counting stays on the device: nothing
waits for the GPU except the history check every `log_every` steps, which
also decides whether AuxK (a second encoder pass) runs until the next one,
and the progress display (:class:`ProgressDisplay`, every few seconds).

A latent is *dead* when it has not fired in the last `dead_after_tokens`
training tokens: the latents AuxK trains, counted in the progress display and
in ``TrainHistory.dead_latents``.

Distributed (interpkernels.distributed; launched by ``torchrun ... -m
interpkernels train-distributed``): `module` may be latent-sharded
(shard_latents), and `data_parallel_group` runs it under
DistributedDataParallel over that group, each rank on its own batches; both
together make a 2-D mesh. ``TrainHistory.bytes_gathered`` / ``bytes_reduced``
give the bytes one step moved through collectives on this rank.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interpkernels._progress import Progress
from interpkernels.nn import JumpReLUSAE, SparseCoder


@dataclass
class TrainHistory:
    steps: list[int] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    auxk_loss: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    tokens_per_second: list[float] = field(default_factory=list)
    dead_latents: list[int] = field(default_factory=list)
    bytes_gathered: list[int] = field(default_factory=list)  # this rank, in the logged step
    bytes_reduced: list[int] = field(default_factory=list)


class DeadLatentCounter:
    """Tokens since each latent last fired, updated on the device without a host sync."""

    def __init__(self, num_latents: int, device: torch.device):
        self.tokens_since_fired = torch.zeros(num_latents, dtype=torch.int64, device=device)

    def update(self, values: torch.Tensor, indices: torch.Tensor, data_parallel_group=None) -> int:
        """Count one batch's code; with `data_parallel_group`, the batches of
        all its ranks (equal sizes), so every rank agrees on the dead latents.
        Returns the bytes all-reduced (0 without a group)."""
        fired = torch.zeros(self.tokens_since_fired.shape, dtype=torch.uint8, device=indices.device).scatter_reduce_(
            0, indices.reshape(-1), (values.reshape(-1) > 0).to(torch.uint8), reduce="amax")
        tokens = values.numel() // values.shape[-1]
        if data_parallel_group is not None:
            torch.distributed.all_reduce(fired, op=torch.distributed.ReduceOp.MAX, group=data_parallel_group)
            tokens *= torch.distributed.get_world_size(data_parallel_group)
        self.tokens_since_fired = torch.where(fired > 0, 0, self.tokens_since_fired + tokens)
        return fired.numel() if data_parallel_group is not None else 0

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


class ProgressDisplay(Progress):
    """What train() shows on stderr while it runs: a tqdm bar of steps on a
    terminal; elsewhere (a log file, CI) plain lines, no '\\r', after the first
    step, then every `PLAIN_LINE_SECONDS` and at the last step, so the first
    news comes within seconds whatever log_every is."""

    def __init__(self, steps: int, num_latents: int):
        super().__init__(steps, "step")
        self.num_latents, self.tokens = num_latents, 0

    def step_done(self, tokens: int) -> None:
        self.tokens += tokens
        self.advance()

    def status_due(self, step: int) -> bool:
        """Whether to show a status now (each status waits for the device)."""
        return step == 1 or step == self.total or self.due()

    def report(self, step: int, fvu: float, l0: float, dead: int) -> None:
        self.show(f"step {step}/{self.total}",
                  f"fvu {fvu:.4f}  l0 {l0:.1f}  dead {dead} of {self.num_latents}  "
                  f"{self.tokens / self.elapsed():,.0f} tok/s")


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
    data_parallel_group: torch.distributed.ProcessGroup | None = None,
) -> TrainHistory:
    """Train `module` for `steps` batches with Adam; returns the logged history.

    autocast_dtype: e.g. torch.bfloat16 to run the ops under torch.autocast
    (parameters stay float32). sparsity_coefficient weighs a JumpReLUSAE's L0.
    log_every: steps between the entries of the history. progress: show a
    :class:`ProgressDisplay` on stderr. data_parallel_group: train under
    DistributedDataParallel over this process group (gradients averaged, so
    the step is that of the mean of the ranks' losses); only its rank 0
    writes checkpoints (a latent-sharded module: one shard per latent rank).
    """
    parameters = [p for p in module.parameters() if p.requires_grad]
    model = module
    gradient_bytes = 0
    if data_parallel_group is not None:
        model = torch.nn.parallel.DistributedDataParallel(module, process_group=data_parallel_group)
        gradient_bytes = sum(p.numel() * p.element_size() for p in parameters)
    writes_checkpoints = data_parallel_group is None or torch.distributed.get_rank(data_parallel_group) == 0
    communication = getattr(module, "communication", None)
    optimizer = torch.optim.Adam(parameters, lr=lr or default_learning_rate(module.num_latents))
    device = next(module.parameters()).device
    dead = DeadLatentCounter(module.num_latents, device)
    history = TrainHistory()
    display = ProgressDisplay(steps, module.num_latents) if progress else None
    started, tokens_since_log = time.perf_counter(), 0
    batch_iter = iter(batches)
    for step in range(1, steps + 1):
        x, target = _split(next(batch_iter))
        if communication is not None:
            communication.reset()  # the history reports one step's bytes
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            # AuxK costs a second encoder pass: run it once the last history check
            # found dead latents. Only that step-counted check decides, never the
            # timed display, so a run does not depend on how fast it ran.
            any_dead = bool(history.dead_latents) and history.dead_latents[-1] > 0
            out = model(x, target, dead_mask=dead.dead_mask(dead_after_tokens) if any_dead else None)
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
        dead_mask_bytes = dead.update(out.values.detach(), out.indices, data_parallel_group)
        tokens = x.numel() // x.shape[-1]
        tokens_since_log += tokens
        if display is not None:
            display.step_done(tokens)

        logging = step % log_every == 0 or step == steps
        showing = display is not None and display.status_due(step)
        if logging or showing:
            fvu, l0, dead_latents = out.fvu.item(), out.l0.item(), int(dead.dead_mask(dead_after_tokens).sum())
        if logging:
            elapsed = time.perf_counter() - started
            history.steps.append(step)
            history.fvu.append(fvu)
            history.auxk_loss.append(out.auxk_loss.item())
            history.l0.append(l0)
            history.tokens_per_second.append(tokens_since_log / elapsed)
            history.dead_latents.append(dead_latents)
            history.bytes_gathered.append(communication.gathered if communication is not None else 0)
            history.bytes_reduced.append((communication.reduced if communication is not None else 0)
                                         + gradient_bytes + dead_mask_bytes)
            started, tokens_since_log = time.perf_counter(), 0
        if showing:
            display.report(step, fvu, l0, dead_latents)
        if checkpoint_dir is not None and step % checkpoint_every == 0 and writes_checkpoints:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            module.save(Path(checkpoint_dir) / f"step_{step}{module.checkpoint_suffix}")
    if display is not None:
        display.close()
    return history
