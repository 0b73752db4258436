"""Latent sharding (tensor parallelism over the dictionary) of interpkernels.nn's coders.

Rank r of a group of R holds the contiguous latents ``latent_slice`` (sizes
differ by at most one): its rows of ``W_enc``, ``b_enc``, ``W_dec`` (and
``log_threshold``), and a replica of everything else (``b_dec``, ``W_skip``).
The input x and the loss are replicated: every rank of the group sees the
same batch.

Encode (:func:`exact_global_topk`): each rank runs the fused top-k over its
latents, keeping its ``min(k, latents held)`` best, then all ranks gather
those candidates (values, rank keys, global indices: N * k per rank, never
``[N, M]``) and select the global top-k by the single-process rank. The
global top-k holds at most k latents of any shard, and a shard's local order
is the global order restricted to it (its latents are contiguous, so lower
local index means lower global index): the selection is exact.

Decode: each rank decodes the code's entries that fall in its slice; the
partial reconstructions are summed over the group. The SparseCoder forward
(FVU, AuxK, JumpReLU's thresholds, BatchTopK's batch selection) then runs
unchanged on the replicated code, through the four methods nn.SparseCoder
routes its latent work through.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import nn

from interpkernels import _validation as v
from interpkernels.distributed.collectives import (
    CommunicationCounter,
    all_gather,
    copy_to_shards,
    gather_over_shards,
    sum_over_shards,
)
from interpkernels.nn import BatchTopKSAE, CrossLayerTranscoder, JumpReLUSAE, SparseCoder, TopKSAE, Transcoder
from interpkernels.ops.sparse_decode import sparse_decode
from interpkernels.ops.topk_encode import topk_encode

# Parameters with one row per latent: sliced. All others are replicated.
LATENT_ROW_PARAMETERS = ("W_enc", "b_enc", "W_dec", "log_threshold")

# Rank-key tiers, best first as topk_encode ranks (csrc/cpu/topk_encode.cpp):
# NaN, then above threshold, then the rest; padding (a shard with fewer than
# k latents) below everything. Packed into the low bits of the gathered index.
_PADDING, _RANKED, _ABOVE_THRESHOLD, _NAN = 0, 1, 2, 3
_TIER_BITS = 2


def shard_bounds(num_latents: int, world_size: int, rank: int) -> slice:
    """Rank's contiguous latents: the first ``M % R`` ranks hold one more."""
    base, extra = divmod(num_latents, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def rank_keys(x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, indices: torch.Tensor,
              pre_bias: torch.Tensor | None, threshold: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre, tier) of the latents `indices [N, k]` of each row of x ``[N, d]``:
    the key topk_encode ranked them by. float32 / float64 on the CPU
    recompute pre with the CPU kernel's own canonical dot (gathered_dot), bit
    for bit; other dtypes and devices in float32 (float64) by torch, whose
    rounding can differ from the kernel's in the last bit, so candidates of
    different shards tied to within that rounding may be ordered otherwise
    than the unsharded kernel orders them."""
    x, W_enc, b_enc, pre_bias = v.autocast_inputs(x.device, x, W_enc, b_enc, pre_bias)
    centered = x if pre_bias is None else x - pre_bias
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        pre = torch.ops.interpkernels.gathered_dot(centered.contiguous(), indices, W_enc.contiguous())
    else:
        accumulate = torch.float64 if x.dtype == torch.float64 else torch.float32
        with torch.autocast(x.device.type, enabled=False):  # else einsum would run in bf16
            pre = torch.einsum("nd,nkd->nk", centered.to(accumulate), W_enc[indices].to(accumulate))
    pre = pre + b_enc.to(pre.dtype)[indices]
    tier = torch.full_like(indices, _RANKED)
    if threshold is not None:
        tier = torch.where(pre > threshold.to(pre.dtype)[indices], _ABOVE_THRESHOLD, tier)
    nan = pre.isnan()
    return pre.masked_fill(nan, 0.0), tier.masked_fill(nan, _NAN)


def select_global_topk(keys: torch.Tensor, packed: torch.Tensor, k: int) -> torch.Tensor:
    """Positions ``[N, k]`` of the k best gathered candidates of each row.

    keys ``[N, C]`` (pre, NaN as 0), packed ``[N, C]`` (global index << 2 |
    tier). Stable sorts, least significant key first: index ascending, then
    pre descending, then tier descending, so ties keep the lower index."""
    index, tier = packed >> _TIER_BITS, packed & ((1 << _TIER_BITS) - 1)
    order = index.argsort(dim=-1, stable=True)
    order = order.gather(-1, keys.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    order = order.gather(-1, tier.gather(-1, order).argsort(dim=-1, descending=True, stable=True))
    return order[:, :k]


def _rank_major(gathered: torch.Tensor) -> torch.Tensor:
    """``[R, N, c]`` gathered candidates as ``[N, R * c]``, rank 0's first."""
    return gathered.permute(1, 0, 2).reshape(gathered.shape[1], -1)


def exact_global_topk(shard: LatentShards, x: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                      pre_bias: torch.Tensor | None = None, threshold: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The code ``(values, global indices) [..., k]`` of the unsharded top-k of x ``[..., d]``,
    on every rank of shard's group, from this rank's encoder rows W_enc / b_enc (module docstring)."""
    group, counter = shard.group, shard.communication
    if v.require_tensor("x", x).dim() < 1:
        raise ValueError(f"x: expected a tensor of shape [..., d], got {v.describe(x)}")
    # Checked here, not by the local topk_encode, which sees only min(k, latents held).
    k = v.require_count("k", k, 1, shard.num_latents, "M")
    leading, d = x.shape[:-1], x.shape[-1]
    rows = leading.numel()
    x_in = copy_to_shards(x.reshape(rows, d), group, counter)
    pre_bias_in = None if pre_bias is None else copy_to_shards(pre_bias, group, counter)
    local_k = min(k, shard.latents_held)
    values, local_indices = topk_encode(x_in, W_enc, b_enc, local_k, pre_bias=pre_bias_in, threshold=threshold,
                                        backend=shard.backend)
    with torch.no_grad():
        keys, tier = rank_keys(x.reshape(rows, d).detach(), W_enc.detach(), b_enc.detach(), local_indices,
                               None if pre_bias is None else pre_bias.detach(), threshold)
        packed = ((local_indices + shard.latent_slice.start) << _TIER_BITS) | tier
    # Every rank gathers the same number of candidates: a shard of fewer
    # than k latents pads with entries that rank below all others.
    padded_k = min(k, shard_bounds(shard.num_latents, dist.get_world_size(group), 0).stop)
    if local_k < padded_k:
        pad = padded_k - local_k
        values = torch.cat([values, values.new_zeros(rows, pad)], dim=1)
        keys = torch.cat([keys, keys.new_full((rows, pad), float("-inf"))], dim=1)
        packed = torch.cat([packed, packed.new_full((rows, pad), (shard.num_latents << _TIER_BITS) | _PADDING)], 1)
    gathered_values = gather_over_shards(values, group, counter)  # [R, N, padded_k]
    gathered_keys = all_gather(keys, group, counter)
    gathered_packed = all_gather(packed, group, counter)
    packed = _rank_major(gathered_packed)
    positions = select_global_topk(_rank_major(gathered_keys), packed, k)
    code_values = _rank_major(gathered_values).gather(-1, positions)
    code_indices = (packed >> _TIER_BITS).gather(-1, positions)
    return code_values.view(*leading, k), code_indices.view(*leading, k)


def is_latent_rows(name: str) -> bool:
    """Whether the parameter (state-dict key) `name` holds one row per latent: sliced
    (``W_enc``, ``b_enc.2`` of a CrossLayerTranscoder's ParameterList, ...)."""
    return name.split(".", 1)[0] in LATENT_ROW_PARAMETERS


class LatentShards:
    """What every latent-sharded module shares: which latents this rank holds,
    its group, the bytes its collectives moved (``communication``), and
    gathering or saving the whole. Built by :func:`shard_latents`."""

    group: object
    latent_slice: slice
    communication: CommunicationCounter
    num_latents: int
    backend: str | None

    @property
    def latents_held(self) -> int:
        return self.latent_slice.stop - self.latent_slice.start

    def _held_entries(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(held [..., k] bool, local indices, 0 where not held) of a code's global indices."""
        held = (indices >= self.latent_slice.start) & (indices < self.latent_slice.stop)
        return held, torch.where(held, indices - self.latent_slice.start, 0)

    def _sum_partials(self, partial: torch.Tensor) -> torch.Tensor:
        """The ranks' partial reconstructions summed, in float32 at least: a bf16
        all-reduce would round at every hop of the ring."""
        accumulate = torch.promote_types(partial.dtype, torch.float32)
        return sum_over_shards(partial.to(accumulate), self.group, self.communication).to(partial.dtype)

    def save(self, path) -> None:
        """Refused: one file cannot hold a dictionary no rank holds whole (SafetensorsModule.save
        would write this rank's rows as if they were the module)."""
        raise TypeError("save: a latent-sharded module is saved with "
                        "interpkernels.distributed.save_checkpoint(module, directory), collectively")

    def gather_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded module's state dict (detached copies), on every rank of the group."""
        world_size = dist.get_world_size(self.group)
        longest = shard_bounds(self.num_latents, world_size, 0)
        state = {}
        for name, tensor in self.state_dict().items():
            if not is_latent_rows(name):
                state[name] = tensor.detach().clone()
                continue
            padded = tensor.new_zeros((longest.stop, *tensor.shape[1:]))
            padded[:tensor.shape[0]] = tensor.detach()
            gathered = all_gather(padded, self.group, self.communication)
            sizes = [len(range(self.num_latents)[shard_bounds(self.num_latents, world_size, r)])
                     for r in range(world_size)]
            state[name] = torch.cat([gathered[r, :size] for r, size in enumerate(sizes)])
        return state

    def unsharded(self) -> nn.Module:
        """A full module of the original class holding the gathered parameters (collective)."""
        base = next(cls for cls in type(self).__mro__ if cls in SHARDABLE)
        module = unallocated_module(base, self.config)
        module.load_state_dict(self.gather_state_dict(), assign=True)
        module.backend = self.backend
        return module


class LatentShardedCoder(LatentShards):
    """Mixin over an interpkernels.nn SparseCoder class holding one rank's latents:
    ``forward`` returns the unsharded module's SparseCoderOutput (global
    indices) on every rank of ``group``, through the four methods
    nn.SparseCoder routes its latent work through."""

    def _candidates(self, x, b_enc, k, *, threshold=None):
        return exact_global_topk(self, x, self.W_enc, b_enc, k, pre_bias=self._pre_bias(), threshold=threshold)

    def _decode_rows(self, values, indices, bias):
        held, local = self._held_entries(indices)
        out = self._sum_partials(sparse_decode(torch.where(held, values, 0), local, self.W_dec, backend=self.backend))
        return out if bias is None else out + bias

    def _at_latents(self, per_latent, indices):
        held, local = self._held_entries(indices)
        return sum_over_shards(torch.where(held, per_latent[local], 0), self.group, self.communication)

    def _held_latents(self, full):
        v.require_shape("dead_mask", full, (self.num_latents,), f"[M] = [{self.num_latents}]")
        return full[self.latent_slice]


class LatentShardedCrossLayerTranscoder(LatentShards, CrossLayerTranscoder):
    """One rank's latents of every layer of a CrossLayerTranscoder: each layer's
    code is the exact global top-k of its own latents; each source layer
    decodes the entries it holds to every later layer, and the ranks' partial
    outputs of all layers are summed in one all-reduce."""

    def encode_layer(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return exact_global_topk(self, x, self.W_enc[layer], self.b_enc[layer], self.config["k"])

    def _contributions(self, source, values, indices):
        held, local = self._held_entries(indices)
        return super()._contributions(source, torch.where(held, values, 0), local)

    def _combined(self, outputs):
        return list(self._sum_partials(torch.stack(outputs)).unbind(0))


def unallocated_module(module_class: type[SparseCoder], config: dict) -> SparseCoder:
    """module_class(**config) with its parameters on the meta device, to be
    loaded with ``load_state_dict(..., assign=True)``: no full-size random
    initialisation (seed None: meta tensors take no generator)."""
    with torch.device("meta"):
        module = module_class(**{**config, "seed": None})
    module.config = dict(config)
    return module


_SHARDED_CLASSES = {cls: type(f"LatentSharded{cls.__name__}", (LatentShardedCoder, cls), {})
                    for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, Transcoder)}
_SHARDED_CLASSES[CrossLayerTranscoder] = LatentShardedCrossLayerTranscoder
SHARDABLE = tuple(_SHARDED_CLASSES)


def shard_latents(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """This rank's latent shard of `module` (the same full module on every rank of `group`).

    Returns a module of a subclass of module's class holding the latents
    ``latent_slice`` (a slice of ``range(M)``; contiguous, sizes differing by at
    most one) and replicas of the other parameters, on module's device. Its
    forward (and encode, decode, auxk_loss) returns what module's would, on
    every rank: the code with global indices, the full reconstruction; its
    backward gives each rank the gradient of its own rows and the full
    replicated gradients. ``gather_state_dict()`` returns the full
    parameters. `group`: the latent-sharding process group (default: the
    whole world). Collective: every rank of group calls it, and each forward.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("shard_latents: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (torchrun sets up its environment)")
    if isinstance(module, LatentShards):
        raise TypeError("module: already latent-sharded")
    base = type(module)
    if base not in _SHARDED_CLASSES:
        raise TypeError(f"module: expected one of {[cls.__name__ for cls in SHARDABLE]}, got {base.__name__}")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    if module.num_latents < world_size:
        raise ValueError(f"module: {module.num_latents} latents cannot be shared by {world_size} ranks")
    bounds = shard_bounds(module.num_latents, world_size, rank)

    # A deep copy whose parameters are the shard's: seeded into deepcopy's memo, so that
    # the full latent rows are never copied.
    memo = {id(parameter): nn.Parameter((parameter.detach()[bounds] if is_latent_rows(name) else parameter.detach())
                                        .clone(), requires_grad=parameter.requires_grad)
            for name, parameter in module.named_parameters()}
    sharded = copy.deepcopy(module, memo)
    sharded.__class__ = _SHARDED_CLASSES[base]
    sharded.group, sharded.latent_slice, sharded.communication = group, bounds, CommunicationCounter()
    return sharded
