"""Latent-sharding scaling benchmark, under torchrun:

    torchrun --nproc-per-node 8 -m interpkernels.distributed.benchmark \\
        --width 768 --latents 1048576 --k 32 --batch-size 4096 --single

Times interpkernels.train steps (forward, backward, Adam, decoder
normalisation; no AuxK) of a TopKSAE sharded over all ranks, as tokens per
second (median over timed intervals of --interval steps, after one warm-up
interval), with the bytes one step moves per rank. --single also times the
unsharded module on rank 0 alone (the other ranks wait), when it fits: the
speed-up is the ratio of the two, measured in one run on the same batch.
Rank 0 prints one line per measurement.
"""

from __future__ import annotations

import argparse
import itertools
import statistics

import torch
import torch.distributed as dist

from interpkernels.distributed.groups import torchrun_process_group
from interpkernels.distributed.sharded import shard_latents
from interpkernels.nn import TopKSAE
from interpkernels.train import train

DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def tokens_per_second(module, batch: torch.Tensor, interval: int, repeats: int, autocast_dtype) -> tuple[float, dict]:
    history = train(module, itertools.repeat(batch), steps=interval * (repeats + 1), log_every=interval,
                    dead_after_tokens=2**62, autocast_dtype=autocast_dtype, progress=False)
    measured = history.tokens_per_second[1:]  # the first interval warms up
    return statistics.median(measured), dict(gathered=history.bytes_gathered[-1], reduced=history.bytes_reduced[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="torchrun ... -m interpkernels.distributed.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="activation width d")
    parser.add_argument("--latents", type=int, default=131072, help="dictionary size M")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="bfloat16: under autocast")
    parser.add_argument("--interval", type=int, default=10, help="steps per timed interval")
    parser.add_argument("--repeats", type=int, default=5, help="timed intervals")
    parser.add_argument("--single", action="store_true", help="also time the unsharded module on rank 0")
    args = parser.parse_args(argv)
    with torchrun_process_group("interpkernels.distributed.benchmark") as device:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        batch = torch.randn(args.batch_size, args.width, generator=torch.Generator().manual_seed(0)).to(device)
        autocast_dtype = DTYPES[args.dtype]
        shape = (f"N={args.batch_size} d={args.width} M={args.latents} k={args.k} {args.dtype} on "
                 f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (gloo)'}")
        sharded = shard_latents(TopKSAE(args.width, args.latents, args.k, seed=0)).to(device)
        rate, moved = tokens_per_second(sharded, batch, args.interval, args.repeats, autocast_dtype)
        if rank == 0:
            print(f"{shape}: {world_size} latent shards: {rate:,.0f} tok/s; per step and rank "
                  f"{moved['gathered']:,} bytes gathered, {moved['reduced']:,} bytes all-reduced", flush=True)
        del sharded
        if args.single and rank == 0:
            single, _ = tokens_per_second(TopKSAE(args.width, args.latents, args.k, seed=0).to(device), batch,
                                          args.interval, args.repeats, autocast_dtype)
            print(f"{shape}: 1 rank, unsharded: {single:,.0f} tok/s; {world_size} shards run "
                  f"{rate / single:.2f}x its speed", flush=True)
        dist.barrier()


if __name__ == "__main__":
    main()
