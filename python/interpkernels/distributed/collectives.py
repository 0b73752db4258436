"""The collectives of latent sharding, as autograd functions, and their byte count.

A latent-sharded module runs two kinds of computation: *replicated* (the
same on every rank of the latent group: the loss, the reconstruction after
its sum, the selection of the global code) and *rank-local* (the rank's own
encoder and decoder rows). Gradients follow from that split, as in
Megatron-LM's tensor parallelism:

- :func:`copy_to_shards`: identity forward; backward sums the rank-local
  gradients (each rank's encoder contributes a part of grad_x).
- :func:`sum_over_shards`: all-reduce forward; backward identity (the loss
  is replicated, so every rank already holds the whole gradient).
- :func:`gather_over_shards`: all-gather forward; backward keeps this
  rank's block, whose gradient is whole on this rank: the replicated part
  plus this rank's own decode, the only rank-local consumer of its entries.

Every call adds its payload to a :class:`CommunicationCounter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommunicationCounter:
    """Bytes this rank moved through collectives since the last :meth:`reset`.

    gathered: bytes this rank *received* from all-gathers (world_size times
    its own contribution); reduced: bytes of the tensors it all-reduced (a
    ring all-reduce sends and receives about twice that).
    """

    gathered: int = 0
    reduced: int = 0

    def reset(self) -> tuple[int, int]:
        """(gathered, reduced) so far, then both back to 0."""
        counts = self.gathered, self.reduced
        self.gathered = self.reduced = 0
        return counts


def _bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def all_gather(tensor: torch.Tensor, group, counter: CommunicationCounter) -> torch.Tensor:
    """``[world_size, *tensor.shape]``: every rank's tensor (same shape on all), not differentiated."""
    world_size = dist.get_world_size(group)
    # Ranks' tensors concatenated along dim 0, the layout every backend (gloo too) accepts;
    # all_gather_single is all_gather_into_tensor's newer name.
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    getattr(dist, "all_gather_single", dist.all_gather_into_tensor)(out, tensor.contiguous(), group=group)
    counter.gathered += _bytes(out)
    return out.view(world_size, *tensor.shape)


def all_reduce_sum(tensor: torch.Tensor, group, counter: CommunicationCounter) -> torch.Tensor:
    """The sum over ranks (a new tensor), not differentiated."""
    out = tensor.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    counter.reduced += _bytes(out)
    return out


class _CopyToShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, counter):
        ctx.group, ctx.counter = group, counter
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad, ctx.group, ctx.counter), None, None


class _SumOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, counter):
        return all_reduce_sum(tensor, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherOverShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor, group, counter):
        ctx.rank = dist.get_rank(group)
        return all_gather(tensor, group, counter)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank], None, None


def copy_to_shards(tensor: torch.Tensor, group, counter: CommunicationCounter) -> torch.Tensor:
    """tensor itself; its gradient is summed over the ranks of `group`."""
    return _CopyToShards.apply(tensor, group, counter)


def sum_over_shards(tensor: torch.Tensor, group, counter: CommunicationCounter) -> torch.Tensor:
    """The sum of tensor over the ranks of `group`; the gradient passes through unchanged."""
    return _SumOverShards.apply(tensor, group, counter)


def gather_over_shards(tensor: torch.Tensor, group, counter: CommunicationCounter) -> torch.Tensor:
    """``[world_size, *tensor.shape]``; the gradient of this rank's block flows back to tensor."""
    return _GatherOverShards.apply(tensor, group, counter)
