"""Checkpoints that load at any world size: one safetensors file per shard plus an index.

    directory/index.json                       class, config, and each file's latent range
    directory/shard-00000-of-00002.safetensors rows [0, 5) of W_enc, b_enc, W_dec, ...; replicas
    directory/shard-00001-of-00002.safetensors rows [5, 9)

Every rank writes only its own rows (no rank ever holds the full
dictionary); rank 0 also writes the replicated parameters (b_dec, W_skip)
and, once all files are complete, the index. Loading reads, through
safetensors' lazy slices, only the rows the loading rank holds, whatever
world size wrote them. Every file is fsynced before save_checkpoint returns,
so a folder renamed into place afterwards (interpkernels.train's
checkpoints) survives a crash whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from interpkernels.distributed.sharded import (
    LatentShards,
    is_latent_rows,
    shard_bounds,
    shard_latents,
    unallocated_module,
)
from interpkernels.nn import MODULES, SparseCoder

INDEX = "index.json"
FORMAT = "interpkernels-latent-shards-1"


def save_checkpoint(module: SparseCoder, directory: str | Path) -> None:
    """Write `module` (sharded: collective over its group; else one shard) to `directory`.

    The index goes last, atomically: a checkpoint overwritten in place loses its
    old index first, so a write cut short leaves one that fails to load, never
    one that loads wrong."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sharded = isinstance(module, LatentShards)
    world_size, rank = (dist.get_world_size(module.group), dist.get_rank(module.group)) if sharded else (1, 0)
    if rank == 0:
        (directory / INDEX).unlink(missing_ok=True)
    if sharded:
        dist.barrier(group=module.group)  # no shard is overwritten while an old index names it
    name = f"shard-{{:05d}}-of-{world_size:05d}.safetensors"
    tensors = {key: tensor.detach().contiguous() for key, tensor in module.state_dict().items()
               if is_latent_rows(key) or rank == 0}
    save_file(tensors, str(directory / name.format(rank)))
    fsync(directory / name.format(rank))
    if sharded:
        dist.barrier(group=module.group)
    if rank == 0:
        shards = []
        for r in range(world_size):
            bounds = shard_bounds(module.num_latents, world_size, r)
            shards.append({"file": name.format(r), "start": bounds.start, "stop": bounds.stop})
        base = next(cls for cls in type(module).__mro__ if cls in MODULES.values())
        index = {"format": FORMAT, "class": base.__name__, "config": module.config,
                 "num_latents": module.num_latents, "shards": shards}
        unfinished = directory / f"{INDEX}.partial"
        unfinished.write_text(json.dumps(index, indent=1))
        fsync(unfinished)
        os.replace(unfinished, directory / INDEX)
        fsync(directory)
    if sharded:
        dist.barrier(group=module.group)  # the index exists on return, on every rank


def fsync(path: Path) -> None:
    """Flush `path` (a file or a folder's entries) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _read_index(directory: Path) -> dict:
    path = directory / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"directory: {directory} holds no {INDEX}; was it written by save_checkpoint?")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"directory: {path} is not an {FORMAT} index")
    return index


def _read_state(directory: Path, index: dict, latents: slice, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The state dict for the latent rows `latents`, read from whichever shard files hold them."""
    from safetensors import safe_open

    rows: dict[str, list[torch.Tensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for shard in index["shards"]:
        start, stop = max(latents.start, shard["start"]), min(latents.stop, shard["stop"])
        with safe_open(str(directory / shard["file"]), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if not is_latent_rows(key):
                    state[key] = f.get_tensor(key)
                elif start < stop:
                    rows.setdefault(key, []).append(f.get_slice(key)[start - shard["start"]:stop - shard["start"]])
    state.update({key: torch.cat(parts) for key, parts in rows.items()})
    return state


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> SparseCoder:
    """The full (unsharded) module a save_checkpoint directory holds, at any world size it was written."""
    directory = Path(directory)
    index = _read_index(directory)
    module = unallocated_module(MODULES[index["class"]], index["config"])
    module.load_state_dict(_read_state(directory, index, slice(0, index["num_latents"]), device), assign=True)
    return module


def load_sharded_checkpoint(directory: str | Path, group: dist.ProcessGroup | None = None,
                            device: str | torch.device = "cpu") -> SparseCoder:
    """This rank's latent shard (as shard_latents gives) of a save_checkpoint directory,
    reading only its rows; collective over `group`, of any size."""
    directory = Path(directory)
    index = _read_index(directory)
    sharded = shard_latents(unallocated_module(MODULES[index["class"]], index["config"]), group)
    state = _read_state(directory, index, sharded.latent_slice, device)
    sharded.load_state_dict(state, assign=True)
    return sharded


def load_checkpoint_into(module: SparseCoder, directory: str | Path) -> None:
    """Copy a save_checkpoint directory's parameters into `module` (latent-sharded:
    its rows only), in place; ValueError when the directory holds another class or
    config (but the seed, which only drew the initial weights)."""
    directory = Path(directory)
    index = _read_index(directory)
    base = next(cls for cls in type(module).__mro__ if cls in MODULES.values())
    if index["class"] != base.__name__ or {**index["config"], "seed": None} != {**module.config, "seed": None}:
        raise ValueError(f"directory: {directory} holds a {index['class']} {index['config']}, "
                         f"not this {base.__name__} {module.config}")
    latents = module.latent_slice if isinstance(module, LatentShards) else slice(0, module.num_latents)
    device = next(module.parameters()).device
    module.load_state_dict(_read_state(directory, index, latents, device))
