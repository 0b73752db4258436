"""``python -m interpkernels train-distributed``: train an SAE on a 2-D mesh under torchrun.

    torchrun --nproc-per-node 8 -m interpkernels train-distributed \\
        --data acts.f32 --width 768 --latents 1048576 --k 32 --latent-shards 4 --out run/

The world of R ranks is a mesh of R / S data-parallel replicas by S latent
shards (``--latent-shards S``). The S ranks of one replica hold the S slices
of the dictionary and read the same batches; replicas read disjoint batches
(every (R/S)-th batch of one shuffled stream of the raw float32 ``[tokens,
d]`` file) and average gradients (DDP). NCCL on GPUs (rank i on cuda:LOCAL_RANK),
gloo on CPUs. Checkpoints go to ``--out`` as ``step_<n>/`` folders (the
module loadable at any world size by interpkernels.distributed.checkpoint,
and each rank's training state); ``--resume`` continues from the newest one
at the same mesh. A collective that waits longer than ``--timeout`` seconds
for a rank (stopped, hung) ends the run with an error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from interpkernels.distributed.checkpoint import save_checkpoint
from interpkernels.distributed.groups import DEFAULT_TIMEOUT_SECONDS, torchrun_process_group
from interpkernels.distributed.sharded import shard_latents
from interpkernels.nn import BatchTopKSAE, JumpReLUSAE, TopKSAE
from interpkernels.train import memmap_batches, train

KINDS = {"topk": TopKSAE, "batchtopk": BatchTopKSAE, "jumprelu": JumpReLUSAE}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun ... -m interpkernels train-distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="raw float32 activations [tokens, d] (numpy .tofile)")
    # not --d: torchrun would read it as an abbreviation of its own --duplicate-* flags
    parser.add_argument("--width", type=int, required=True, help="activation width d")
    parser.add_argument("--latents", type=int, required=True, help="dictionary size M")
    parser.add_argument("--k", type=int, required=True, help="active latents per token")
    parser.add_argument("--kind", choices=sorted(KINDS), default="topk")
    parser.add_argument("--latent-shards", type=int, default=1, help="ranks sharing one dictionary (S)")
    parser.add_argument("--batch-size", type=int, default=4096, help="tokens per step per data-parallel replica")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: scaled with M, train.py)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order (same on every rank)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="the newest checkpoints kept in --out")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in --out (same flags, same mesh) to --steps")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS,
                        help="seconds a collective waits for the other ranks before the run ends with an error "
                             "(raise it if a checkpoint write takes longer)")
    parser.add_argument("--out", required=True, help="folder for checkpoints and history.json")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with torchrun_process_group("interpkernels train-distributed", args.timeout) as device:
        run(args, device)


def run(args: argparse.Namespace, device: torch.device) -> None:
    world_size, rank = dist.get_world_size(), dist.get_rank()
    shards = args.latent_shards
    if shards < 1 or world_size % shards:
        raise SystemExit(f"--latent-shards: expected a divisor of the world size {world_size}, got {shards}")
    replicas = world_size // shards
    mesh = init_device_mesh(device.type, (replicas, shards), mesh_dim_names=("data", "latent"))
    replica = mesh.get_local_rank("data")

    # Built in host memory on every rank (the same seed: the same module); only the shard goes to the device.
    module = KINDS[args.kind](args.width, args.latents, args.k, seed=args.seed)
    if shards > 1:
        module = shard_latents(module, mesh.get_group("latent"))
    module = module.to(device)
    batches = memmap_batches(args.data, args.width, args.batch_size, device=device, shuffle_seed=args.seed,
                             stride=replicas, offset=replica)
    out = Path(args.out)
    history = train(module, batches, steps=args.steps, lr=args.lr, log_every=args.log_every,
                    checkpoint_dir=out, checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=args.keep_checkpoints, resume=args.resume, progress=rank == 0,
                    data_parallel_group=mesh.get_group("data") if replicas > 1 else None)
    if replica == 0:
        save_checkpoint(module, out / "final")
    if rank == 0:
        (out / "history.json").write_text(json.dumps(vars(history), indent=1))
        print(f"{world_size} ranks = {replicas} data-parallel x {shards} latent shards; final fvu "
              f"{history.fvu[-1]:.4f}; per step on rank 0: {history.bytes_gathered[-1]:,} bytes gathered, "
              f"{history.bytes_reduced[-1]:,} bytes all-reduced; checkpoint {out / 'final'}", file=sys.stderr)
