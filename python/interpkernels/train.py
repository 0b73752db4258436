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

Checkpoints (`checkpoint_dir`) are ``step_<n>/`` folders, each written whole
or not at all (a hidden folder, fsynced, renamed), the newest few kept;
``resume=True`` continues from the newest, bit for bit on CPU. The first
non-finite loss is recorded on the device and stops the run
(FloatingPointError) at the next history check or checkpoint, which no
non-finite value reaches.

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
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from interpkernels._nonfinite import NonFiniteWatch
from interpkernels._progress import Progress
from interpkernels.distributed.checkpoint import fsync, load_checkpoint_into, save_checkpoint
from interpkernels.distributed.sharded import LatentShards
from interpkernels.nn import SparseCoder


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


class MemmapBatches:
    """The batches of :func:`memmap_batches`: an endless iterator whose
    position (batches yielded) :meth:`state_dict` saves and
    :meth:`load_state_dict` restores exactly, without reading the rows it
    skips: train(..., resume=True) continues it where the checkpoint left it."""

    def __init__(self, array: np.memmap, batch_size: int, device, shuffle_seed: int | None, stride: int, offset: int):
        self.array, self.batch_size, self.device = array, batch_size, device
        self.shuffle_seed, self.stride, self.offset = shuffle_seed, stride, offset
        self.starts = np.arange(0, len(array) - batch_size + 1, batch_size)  # one epoch, unshuffled
        self.position = 0
        self._epoch, self._order, self._rng = -1, self.starts, None

    def __iter__(self) -> MemmapBatches:
        return self

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The batch starts of `epoch`: each epoch the next shuffle of the seeded generator."""
        if self.shuffle_seed is None:
            return self.starts
        if epoch < self._epoch or self._rng is None:
            self._epoch, self._rng = -1, np.random.default_rng(self.shuffle_seed)
        while self._epoch < epoch:
            self._order = self.starts.copy()
            self._rng.shuffle(self._order)
            self._epoch += 1
        return self._order

    def __next__(self) -> torch.Tensor:
        epoch, within = divmod(self.offset + self.position * self.stride, len(self.starts))
        start = self._epoch_order(epoch)[within]
        self.position += 1
        return torch.from_numpy(np.array(self.array[start:start + self.batch_size])).to(self.device)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def memmap_batches(path: str | Path, d: int, batch_size: int, *, dtype=np.float32, device="cpu",
                   shuffle_seed: int | None = 0, stride: int = 1, offset: int = 0) -> MemmapBatches:
    """Endless batches ``[batch_size, d]`` from a raw ``[tokens, d]`` array file
    (numpy.memmap: only the rows of a batch are read), in a new order each
    epoch (shuffle_seed None: file order).

    stride, offset: yield only the batches offset, offset + stride, ... of
    that stream (data-parallel replica `offset` of `stride`); the others are
    never read. Raises ValueError at once (not at the first batch) when the
    file is not a whole number of rows of d values, or holds fewer than
    batch_size rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected at least 1, got {batch_size}")
    if stride < 1 or not 0 <= offset < stride:
        raise ValueError(f"stride, offset: expected 0 <= offset < stride, got offset={offset}, stride={stride}")
    row_bytes = d * np.dtype(dtype).itemsize
    size = os.path.getsize(path)
    if size % row_bytes:
        raise ValueError(f"{path}: {size} bytes is not a whole number of rows of d={d} {np.dtype(dtype).name} "
                         f"values ({row_bytes} bytes each); is d or dtype wrong?")
    rows = size // row_bytes
    if rows < batch_size:
        raise ValueError(f"{path}: holds {rows} rows of d={d}, fewer than batch_size={batch_size}")
    array = np.memmap(path, dtype=dtype, mode="r", shape=(rows, d))
    return MemmapBatches(array, batch_size, device, shuffle_seed, stride, offset)


class ProgressDisplay(Progress):
    """What train() shows on stderr while it runs: a tqdm bar of steps on a
    terminal; elsewhere (a log file, CI) plain lines, no '\\r', after the first
    step, then every `PLAIN_LINE_SECONDS` and at the last step, so the first
    news comes within seconds whatever log_every is. A resumed run counts
    from its first step, `first_step`."""

    def __init__(self, steps: int, num_latents: int, first_step: int = 1):
        super().__init__(steps - first_step + 1, "step")
        self.steps, self.first_step = steps, first_step
        self.num_latents, self.tokens = num_latents, 0

    def step_done(self, tokens: int) -> None:
        self.tokens += tokens
        self.advance()

    def status_due(self, step: int) -> bool:
        """Whether to show a status now (each status waits for the device)."""
        return step in (self.first_step, self.steps) or self.due()

    def report(self, step: int, fvu: float, l0: float, dead: int) -> None:
        self.show(f"step {step}/{self.steps}",
                  f"fvu {fvu:.4f}  l0 {l0:.1f}  dead {dead} of {self.num_latents}  "
                  f"{self.tokens / self.elapsed():,.0f} tok/s")


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)


class TrainingRanks:
    """Where this process stands among those that train one module: data-parallel
    replica `data_rank` of `data_size` (train's data_parallel_group) and latent shard
    `latent_rank` of `latent_size` (a latent-sharded module's group); 0 of 1 without."""

    def __init__(self, module: SparseCoder, data_parallel_group):
        self.groups = []
        self.data_rank, self.data_size = self._join(data_parallel_group, data_parallel_group is not None)
        self.latent_rank, self.latent_size = self._join(getattr(module, "group", None),
                                                        isinstance(module, LatentShards))

    def _join(self, group, present: bool) -> tuple[int, int]:
        if not present:
            return 0, 1
        self.groups.append(group)
        return dist.get_rank(group), dist.get_world_size(group)

    @property
    def index(self) -> int:
        return self.data_rank * self.latent_size + self.latent_rank

    @property
    def count(self) -> int:
        return self.data_size * self.latent_size

    def barrier(self) -> None:
        """Every rank of the mesh is here: each waited for its replicas, then for its shards."""
        for group in self.groups:
            dist.barrier(group=group)

    def minimum(self, value: torch.Tensor) -> int:
        """The least of every rank's `value` (a 0-d integer tensor)."""
        value = value.clone()
        for group in self.groups:
            dist.all_reduce(value, op=dist.ReduceOp.MIN, group=group)
        return int(value)


# A checkpoint is the folder step_<n>: the module (save_checkpoint's layout, so load_checkpoint reads it)
# and one training state per rank. Written as a hidden .step_<n>.partial folder, then renamed.
CHECKPOINT_NAME = re.compile(r"step_(\d+)")
UNFINISHED_PREFIX = ".step_"


def checkpoints(directory: str | Path) -> dict[int, Path]:
    """The complete checkpoints (step_<n> folders) of a train() checkpoint_dir, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    found = [(int(match[1]), path) for path in directory.iterdir()
             if path.is_dir() and (match := CHECKPOINT_NAME.fullmatch(path.name))]
    return dict(sorted(found))


def _training_state_name(ranks: TrainingRanks) -> str:
    return f"training-state-{ranks.index:05d}-of-{ranks.count:05d}.pt"


def _write_checkpoint(directory: Path, step: int, module: SparseCoder, state: dict, ranks: TrainingRanks,
                      keep: int) -> Path:
    """directory/step_<step>, whole or not at all: written into a hidden folder, each
    file fsynced, then renamed; the oldest beyond `keep` go (renamed away first, so a
    crash while deleting leaves no partial step_<n>). Collective over the mesh."""
    final, partial = directory / f"step_{step}", directory / f"{UNFINISHED_PREFIX}{step}.partial"
    if ranks.index == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    ranks.barrier()
    if ranks.data_rank == 0:
        save_checkpoint(module, partial)  # collective over the latent shards
    state_path = partial / _training_state_name(ranks)
    torch.save(state, state_path)
    fsync(state_path)
    ranks.barrier()
    if ranks.index == 0:
        fsync(partial)
        os.rename(partial, final)
        for old_step, old in list(checkpoints(directory).items())[:-keep]:
            removed = directory / f"{UNFINISHED_PREFIX}{old_step}.removed"
            os.rename(old, removed)
            shutil.rmtree(removed)
        fsync(directory)
    ranks.barrier()  # the checkpoint exists on return, on every rank
    return final


def _resume_state(directory: Path, steps: int, ranks: TrainingRanks) -> tuple[Path, dict] | None:
    """(the newest checkpoint, this rank's training state in it), or None when there is none."""
    found = checkpoints(directory)
    if not found:
        return None
    step, path = found.popitem()
    if step > steps:
        raise ValueError(f"resume: the newest checkpoint, {path}, is past steps={steps}")
    state_path = path / _training_state_name(ranks)
    if not state_path.is_file():
        raise ValueError(f"resume: {path} holds no {state_path.name}: it was written by another mesh of ranks "
                         f"({sorted(p.name for p in path.glob('training-state-*'))}); resume at that mesh")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if state["mesh"] != [ranks.data_size, ranks.latent_size]:
        raise ValueError(f"resume: {path} was written by {state['mesh'][0]} data-parallel x {state['mesh'][1]} "
                         f"latent ranks, this run has {ranks.data_size} x {ranks.latent_size}; resume at that mesh")
    return path, state


def _is_restorable(batches: Iterable) -> bool:
    """Whether `batches` saves its position itself (MemmapBatches; torchdata's StatefulDataLoader)."""
    return callable(getattr(batches, "state_dict", None)) and callable(getattr(batches, "load_state_dict", None))


def _training_state(step: int, ranks: TrainingRanks, optimizer: torch.optim.Optimizer, dead: DeadLatentCounter,
                    history: TrainHistory, batches: Iterable, device: torch.device) -> dict:
    """What a rank needs, beside the module's parameters, to continue after `step` as if never stopped."""
    return {"step": step, "mesh": [ranks.data_size, ranks.latent_size],
            "optimizer": optimizer.state_dict(), "tokens_since_fired": dead.tokens_since_fired,
            "history": asdict(history),  # its last dead-latent count turns AuxK on or off
            "cpu_rng": torch.get_rng_state(),
            "device_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "data": batches.state_dict() if _is_restorable(batches) else None}


def _restore_training_state(state: dict, optimizer: torch.optim.Optimizer, dead: DeadLatentCounter,
                            batches: Iterable, device: torch.device) -> tuple[TrainHistory, int]:
    """Put a _training_state back; returns the history and how many batches to skip
    (those of the steps done, for batches that cannot restore their position)."""
    optimizer.load_state_dict(state["optimizer"])
    dead.tokens_since_fired = state["tokens_since_fired"].to(device)
    torch.set_rng_state(state["cpu_rng"])
    if state["device_rng"] is not None:
        torch.cuda.set_rng_state(state["device_rng"], device)
    if _is_restorable(batches) and state["data"] is not None:
        batches.load_state_dict(state["data"])
        return TrainHistory(**state["history"]), 0
    return TrainHistory(**state["history"]), state["step"]


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
    keep_checkpoints: int = 3,
    resume: bool = False,
    progress: bool = True,
    data_parallel_group: torch.distributed.ProcessGroup | None = None,
) -> TrainHistory:
    """Train `module` for `steps` batches with Adam; returns the logged history.

    autocast_dtype: e.g. torch.bfloat16 to run the ops under torch.autocast
    (parameters stay float32). sparsity_coefficient weighs the L0 of a code with learned thresholds
    (JumpReLUSAE, JumpReLUTranscoder).
    log_every: steps between the entries of the history. progress: show a
    :class:`ProgressDisplay` on stderr. data_parallel_group: train under
    DistributedDataParallel over this process group (gradients averaged, so
    the step is that of the mean of the ranks' losses).

    checkpoint_dir: every `checkpoint_every` steps, write the folder
    ``step_<n>`` there (atomically; the newest `keep_checkpoints` kept): the
    module (load_checkpoint reads it) and every rank's training state
    (optimizer, step, RNG, dead-latent counts, history, data position). A
    fresh run refuses a folder that holds checkpoints already. resume: start
    from the newest checkpoint there (none yet: from scratch) and continue
    to `steps` in all, at the mesh of ranks that wrote it; batches that save
    their position (:class:`MemmapBatches`, or anything with state_dict and
    load_state_dict) continue exactly where it left them, others are
    fast-forwarded by the steps done (read and dropped), so they must start
    where the first run's did.

    A non-finite loss (or, at a checkpoint, non-finite parameters) raises
    FloatingPointError naming the step and the last good checkpoint; it is
    noticed at the next history entry or checkpoint (the module then holds
    non-finite parameters), never written into a checkpoint.
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume: needs the checkpoint_dir to resume from")
    if keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints: expected at least 1, got {keep_checkpoints}")
    parameters = [p for p in module.parameters() if p.requires_grad]
    device = next(module.parameters()).device
    ranks = TrainingRanks(module, data_parallel_group)
    optimizer = torch.optim.Adam(parameters, lr=lr or default_learning_rate(module.num_latents))
    dead = DeadLatentCounter(module.num_latents, device)
    history = TrainHistory()
    first_step, last_checkpoint, batches_to_skip = 1, None, 0
    if checkpoint_dir is not None:
        checkpoint_dir = Path(checkpoint_dir)
        if not resume and checkpoints(checkpoint_dir):
            raise ValueError(f"checkpoint_dir: {checkpoint_dir} holds checkpoints already "
                             f"({[p.name for p in checkpoints(checkpoint_dir).values()]}); pass resume=True to "
                             "continue that run, or another folder")
        resumed = _resume_state(checkpoint_dir, steps, ranks) if resume else None
        if ranks.index == 0:
            for unfinished in checkpoint_dir.glob(f"{UNFINISHED_PREFIX}*"):  # cut short by a crash
                shutil.rmtree(unfinished)
        if resumed is not None:
            last_checkpoint, state = resumed
            load_checkpoint_into(module, last_checkpoint)
            history, batches_to_skip = _restore_training_state(state, optimizer, dead, batches, device)
            first_step = state["step"] + 1
    model = module
    gradient_bytes = 0
    if data_parallel_group is not None:
        model = torch.nn.parallel.DistributedDataParallel(module, process_group=data_parallel_group)
        gradient_bytes = sum(p.numel() * p.element_size() for p in parameters)
    communication = getattr(module, "communication", None)
    display = ProgressDisplay(steps, module.num_latents, first_step) if progress else None
    started, tokens_since_log = time.perf_counter(), 0
    batch_iter = iter(batches)
    for _ in range(batches_to_skip):
        next(batch_iter)
    nonfinite = NonFiniteWatch(steps, device)

    def stop_if_nonfinite() -> None:
        first = ranks.minimum(nonfinite.first)
        if first < nonfinite.never:
            where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
                     else "no checkpoint was written before it")
            raise FloatingPointError(f"train: the loss or the parameters became non-finite (NaN or inf) at step "
                                     f"{first}; {where}")

    for step in range(first_step, steps + 1):
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
        if getattr(module, "learns_thresholds", False):
            loss = loss + sparsity_coefficient * out.l0
        nonfinite.loss(loss, step)
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
        if logging:  # the last step always is
            stop_if_nonfinite()
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
        if checkpoint_dir is not None and step % checkpoint_every == 0:
            nonfinite.parameters(parameters, step)
            stop_if_nonfinite()
            state = _training_state(step, ranks, optimizer, dead, history, batches, device)
            last_checkpoint = _write_checkpoint(checkpoint_dir, step, module, state, ranks, keep_checkpoints)
    if display is not None:
        display.close()
    return history
