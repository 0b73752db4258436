"""Scaling out on torch.distributed: latent-sharded coders, checkpoints across
world sizes, and the ``python -m interpkernels train-distributed`` launcher
(docs/OPS.md, "Distributed")."""

from interpkernels.distributed.checkpoint import (
    load_checkpoint,
    load_checkpoint_into,
    load_sharded_checkpoint,
    save_checkpoint,
)
from interpkernels.distributed.collectives import CommunicationCounter
from interpkernels.distributed.groups import process_group
from interpkernels.distributed.sharded import (
    LatentShardedCoder,
    LatentShardedCrossLayerTranscoder,
    LatentShards,
    shard_bounds,
    shard_latents,
)

__all__ = ["CommunicationCounter", "LatentShardedCoder", "LatentShardedCrossLayerTranscoder", "LatentShards",
           "load_checkpoint", "load_checkpoint_into", "load_sharded_checkpoint",
           "process_group", "save_checkpoint", "shard_bounds", "shard_latents"]
