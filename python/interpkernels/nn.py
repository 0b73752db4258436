"""SAEs and transcoders on the fused ops.

Every module stores its encoder row-per-latent (``W_enc [M, d_in]``, as
``nn.Linear.weight``) and its decoder row-per-latent (``W_dec [M, d_out]``),
and returns a :class:`SparseCoderOutput` from ``forward``. Codes are sparse
``(values [..., k], indices [..., k])`` pairs throughout: the dense
``[tokens, latents]`` matrix is never built.

- :class:`TopKSAE`: k latents per token (Gao et al. 2024).
- :class:`BatchTopKSAE`: k latents per token on average over the batch.
- :class:`JumpReLUSAE`: per-latent thresholds trained straight-through.
- :class:`Transcoder`: encodes an MLP's input, decodes toward its output,
  optional linear skip ``W_skip [d_out, d_in]``.
- :class:`JumpReLUTranscoder`: a transcoder with a JumpReLU code.
- :class:`CrossLayerTranscoder`: layer l's code decodes to layers l..L-1.
- :class:`JumpReLUCrossLayerTranscoder`: a cross-layer transcoder with a
  JumpReLU code per layer.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from interpkernels import _validation as v
from interpkernels.ops import sae_training
from interpkernels.ops.batch_topk_encode import keep_batch_top, resolve_max_per_row
from interpkernels.ops.jumprelu_encode import apply_slot_threshold, apply_threshold, slot_threshold_l0
from interpkernels.ops.multi_target_decode import multi_target_decode
from interpkernels.ops.sparse_decode import sparse_decode
from interpkernels.ops.topk_encode import topk_encode


class SparseCoderOutput(NamedTuple):
    reconstruction: torch.Tensor  # [..., d_out]
    values: torch.Tensor  # [..., k] sparse code
    indices: torch.Tensor  # [..., k] int64
    fvu: torch.Tensor  # 0-d, float32 (float64 for a float64 module)
    auxk_loss: torch.Tensor  # 0-d, like fvu (0 without a dead mask)
    l0: torch.Tensor  # 0-d: mean active latents per token (differentiable for JumpReLU)


def init_generator(seed: int | None) -> torch.Generator | None:
    """The generator of a module's initial weights, or None for torch's global one.

    Seeded from a hash of ("interpkernels.nn", seed), not from seed itself: data
    drawn from a generator seeded alike (``torch.manual_seed(seed)``, the
    demo's synthetic features) would otherwise share its first draws with the
    weights, and the module would start out knowing what it is to learn.
    """
    if seed is None:
        return None
    digest = hashlib.sha256(f"interpkernels.nn:{seed}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def unit_rows(shape: tuple[int, ...], generator: torch.Generator | None = None) -> torch.Tensor:
    weight = torch.randn(shape, generator=generator)
    return weight / weight.norm(dim=-1, keepdim=True)


class SafetensorsModule(nn.Module):
    """Saving to and loading from one safetensors file: the state dict, plus
    the class name and ``config`` (the constructor's arguments) as metadata."""

    config: dict

    def save(self, path: str | Path) -> None:
        """Parameters and config to one safetensors file."""
        from safetensors.torch import save_file

        tensors = {name: p.detach().contiguous() for name, p in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"class": type(self).__name__, "config": json.dumps(self.config)})

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> SafetensorsModule:
        """Rebuild a module saved by :meth:`save` (any subclass)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        module_class = MODULES[metadata["class"]]
        if not issubclass(module_class, cls):
            raise TypeError(f"path: holds a {metadata['class']}, not a {cls.__name__}")
        module = module_class(**json.loads(metadata["config"]))
        module.load_state_dict(load_file(str(path), device=str(device)))
        return module.to(device)


class SparseCoder(SafetensorsModule):
    """Shared machinery: parameters, encode/decode/forward, AuxK, safetensors I/O.

    Parameters: ``W_enc [M, d_in]``, ``b_enc [M]``, ``W_dec [M, d_out]``,
    ``b_dec [d_out]``. SAEs (d_in == d_out, reconstructing their input)
    subtract ``b_dec`` from the input before encoding, as Bricken et al. and
    Gao et al. do. Subclasses choose the code (:meth:`encode`); ``config``
    holds the constructor's arguments, so :meth:`load` can rebuild any of them.
    ``backend`` (attribute, not saved) picks the ops' implementation; "torch"
    runs the dense reference, for comparisons.

    Everything that touches the latents goes through four methods,
    :meth:`_candidates`, :meth:`_decode_rows`, :meth:`_at_latents` and
    :meth:`_held_latents`: a latent-sharded module
    (interpkernels.distributed.shard_latents) overrides just these.
    """

    # A code with learned thresholds trains on fvu + sparsity_coefficient * l0 (interpkernels.train).
    learns_thresholds = False

    backend: str | None = None
    # SAEs keep decoder rows on the unit sphere while training (interpkernels.train).
    normalizes_decoder = True

    def __init__(self, d_in: int, num_latents: int, k: int, *, d_out: int | None = None,
                 k_aux: int | None = None, seed: int | None = None):
        super().__init__()
        self.config = dict(d_in=d_in, num_latents=num_latents, k=k, k_aux=k_aux, seed=seed)
        self.d_in, self.d_out = d_in, d_in if d_out is None else d_out
        self.num_latents, self.k = num_latents, k
        self.k_aux = k_aux if k_aux is not None else min(num_latents, max(d_in // 2, 1))
        generator = init_generator(seed)
        W_dec = unit_rows((num_latents, self.d_out), generator)
        # Tied initialisation (W_enc = W_dec) where the shapes allow it.
        W_enc = W_dec.clone() if d_in == self.d_out else unit_rows((num_latents, d_in), generator)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(num_latents))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))

    def _pre_bias(self) -> torch.Tensor | None:
        return self.b_dec

    def _candidates(self, x: torch.Tensor, b_enc: torch.Tensor, k: int, *,
                    threshold: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """topk_encode of x on this module's encoder with bias `b_enc` (and
        `threshold`), both given for the latents the module holds."""
        return topk_encode(x, self.W_enc, b_enc, k, pre_bias=self._pre_bias(), threshold=threshold,
                           backend=self.backend)

    def _decode_rows(self, values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """sparse_decode of a code of (global) latent indices on W_dec."""
        return sparse_decode(values, indices, self.W_dec, bias, backend=self.backend)

    def _at_latents(self, per_latent: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``per_latent[indices]`` for a per-latent parameter held like b_enc."""
        return per_latent[indices]

    def _held_latents(self, full: torch.Tensor) -> torch.Tensor:
        """The entries of a full ``[M]`` tensor for the latents this module holds."""
        return full

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse code ``(values [..., k], indices [..., k])`` of x."""
        return self._candidates(x, self.b_enc, self.k)

    def decode(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self._decode_rows(values, indices, self.b_dec)

    def reconstruct(self, x: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        return self.decode(values, indices)

    def _encode_with_l0(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values, indices = self.encode(x)
        return values, indices, (values > 0).sum(-1).float().mean()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, *,
                dead_mask: torch.Tensor | None = None) -> SparseCoderOutput:
        """Encode x and reconstruct ``target`` (x itself for an SAE).

        dead_mask: ``[M]`` bool of latents that have not fired for a while;
        then ``auxk_loss`` is the normalized error of reconstructing the
        residual from the ``k_aux`` largest dead latents (Gao et al. 2024),
        with gradients into the encoder.

        A batch of no rows raises a ValueError: its FVU would be 0 / 0.
        """
        v.require_rows("x", v.require_tensor("x", x))
        target = x if target is None else target
        values, indices, l0 = self._encode_with_l0(x)
        reconstruction = self.reconstruct(x, values, indices)
        fvu = sae_training.fvu(reconstruction, target, backend=self.backend)
        auxk_loss = fvu.new_zeros(())
        if dead_mask is not None:
            auxk_loss = self.auxk_loss(x, target - reconstruction.detach(), dead_mask)
        return SparseCoderOutput(reconstruction, values, indices, fvu, auxk_loss, l0)

    def auxk_loss(self, x: torch.Tensor, residual: torch.Tensor, dead_mask: torch.Tensor) -> torch.Tensor:
        """||e_hat - e||^2 / ||e - mean(e)||^2 with e_hat decoded from the top
        k_aux dead latents, scaled by min(#dead / k_aux, 1) as sparsify does.
        No host sync: live latents compete at -inf, so where fewer than k_aux
        latents are dead the extra slots hold zeros."""
        dead_only_bias = self.b_enc.masked_fill(~self._held_latents(dead_mask), float("-inf"))
        values, indices = self._candidates(x, dead_only_bias, self.k_aux)
        residual_hat = self._decode_rows(values, indices, None)
        scale = (dead_mask.sum() / self.k_aux).clamp(max=1.0)
        return scale * sae_training.fvu(residual_hat, residual, backend=self.backend)

    def normalize_decoder_(self) -> None:
        """Decoder rows to unit norm (after each optimizer step, as Gao et al.)."""
        sae_training.normalize_rows_(self.W_dec.data, backend=self.backend)

    def remove_decoder_parallel_gradient_(self) -> None:
        """Drop the gradient's component along each decoder row, so a step on
        unit-norm rows moves them along the sphere (before the optimizer step)."""
        if self.W_dec.grad is not None:
            sae_training.remove_parallel_component_(self.W_dec.grad, self.W_dec.data, backend=self.backend)

class TopKSAE(SparseCoder):
    """``values, indices = top-k of relu((x - b_dec) @ W_enc.T + b_enc)``."""

    def __init__(self, d_in: int, num_latents: int, k: int, *, k_aux: int | None = None, seed: int | None = None):
        super().__init__(d_in, num_latents, k, k_aux=k_aux, seed=seed)


class BatchTopKSAE(SparseCoder):
    """Keeps the N*k largest activations over a batch of N tokens; the code is
    padded to ``max_per_row`` slots per token (zeros where unused)."""

    def __init__(self, d_in: int, num_latents: int, k: int, *, max_per_row: int | None = None,
                 k_aux: int | None = None, seed: int | None = None):
        super().__init__(d_in, num_latents, k, k_aux=k_aux, seed=seed)
        self.config["max_per_row"] = self.max_per_row = max_per_row

    def encode(self, x):
        max_per_row = resolve_max_per_row(self.k, self.max_per_row, self.num_latents)
        values, indices = self._candidates(x, self.b_enc, max_per_row)
        return keep_batch_top(values, self.k), indices


class JumpReLUSAE(SparseCoder):
    """``f = pre * 1[pre > threshold]`` with learned positive thresholds (stored
    as their log), kept sparse with at most ``k`` (max L0) latents per token.
    ``l0`` in the output carries the straight-through threshold gradient:
    train on ``fvu + sparsity_coefficient * l0``."""

    learns_thresholds = True

    def __init__(self, d_in: int, num_latents: int, k: int, *, initial_threshold: float = 0.001,
                 bandwidth: float = 0.001, k_aux: int | None = None, seed: int | None = None):
        super().__init__(d_in, num_latents, k, k_aux=k_aux, seed=seed)
        self.config.update(initial_threshold=initial_threshold, bandwidth=bandwidth)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((num_latents,), float(initial_threshold)).log())

    def _encode_with_l0(self, x):
        return jumprelu_code(self, x, self.log_threshold.exp())

    def encode(self, x):
        values, indices, _ = self._encode_with_l0(x)
        return values, indices


def jumprelu_code(module: SparseCoder, x: torch.Tensor,
                  threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """JumpReLU code of x on `module`'s encoder, at most ``module.k`` latents per
    token: ``(values, indices, l0)``, l0 carrying the straight-through
    threshold gradient (bandwidth ``module.bandwidth``)."""
    candidates, indices = module._candidates(x, module.b_enc, module.k, threshold=threshold)
    slot_threshold = module._at_latents(threshold, indices)
    values = apply_slot_threshold(candidates, slot_threshold, module.bandwidth)
    return values, indices, slot_threshold_l0(candidates, slot_threshold, module.bandwidth)


class Transcoder(SparseCoder):
    """Encodes an MLP's input ``[..., d_in]`` and reconstructs its output
    ``[..., d_out]`` (pass it as ``target``); with ``skip=True`` a linear
    ``W_skip [d_out, d_in]`` (initialised to zero) adds ``x @ W_skip.T``."""

    normalizes_decoder = False

    def __init__(self, d_in: int, num_latents: int, k: int, *, d_out: int | None = None, skip: bool = False,
                 k_aux: int | None = None, seed: int | None = None):
        super().__init__(d_in, num_latents, k, d_out=d_out, k_aux=k_aux, seed=seed)
        self.config.update(d_out=self.d_out, skip=skip)
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in)) if skip else None

    def _pre_bias(self):
        return None  # input and output live in different spaces

    def reconstruct(self, x, values, indices):
        reconstruction = self.decode(values, indices)
        return reconstruction if self.W_skip is None else reconstruction + x @ self.W_skip.T

    def forward(self, x, target=None, *, dead_mask=None):
        if target is None:
            raise ValueError("target: a transcoder reconstructs the MLP output; pass it as target")
        return super().forward(x, target, dead_mask=dead_mask)


class JumpReLUTranscoder(Transcoder):
    """A transcoder with a JumpReLU code, ``f = pre * 1[pre > threshold]``, the
    kind circuit-tracer and Gemma Scope publish (a ReLU transcoder is one with
    zero thresholds). ``threshold [M]`` is stored as is, not as its log as
    :class:`JumpReLUSAE` keeps it: loaded thresholds then stay bit-exact. It
    must stay non-negative (the code's values are taken from ``relu(pre)``).
    At most ``k`` latents per token are kept, the largest; ``k = num_latents``
    keeps every latent above its threshold."""

    learns_thresholds = True

    def __init__(self, d_in: int, num_latents: int, k: int, *, d_out: int | None = None, skip: bool = False,
                 initial_threshold: float = 0.001, bandwidth: float = 0.001, k_aux: int | None = None,
                 seed: int | None = None):
        super().__init__(d_in, num_latents, k, d_out=d_out, skip=skip, k_aux=k_aux, seed=seed)
        self.config.update(initial_threshold=initial_threshold, bandwidth=bandwidth)
        self.bandwidth = bandwidth
        self.threshold = nn.Parameter(torch.full((num_latents,), float(initial_threshold)))

    def _encode_with_l0(self, x):
        return jumprelu_code(self, x, self.threshold)

    def encode(self, x):
        values, indices, _ = self._encode_with_l0(x)
        return values, indices


class CrossLayerTranscoder(SafetensorsModule):
    """L layers of ``M`` latents each; layer l encodes its MLP input and its
    code decodes to the MLP outputs of layers l, l+1, ..., L-1 through one
    multi-target decode (the code read once). The decoder of layer l is
    stored latent-major, ``[M, L - l, d]``; :meth:`decoder` gives the
    ``[L - l, M, d]`` view."""

    backend: str | None = None

    def __init__(self, num_layers: int, d_model: int, num_latents: int, k: int, *, seed: int | None = None):
        super().__init__()
        self.config = dict(num_layers=num_layers, d_model=d_model, num_latents=num_latents, k=k, seed=seed)
        self.num_latents = num_latents
        generator = init_generator(seed)
        self.W_enc = nn.ParameterList(nn.Parameter(unit_rows((num_latents, d_model), generator))
                                      for _ in range(num_layers))
        self.b_enc = nn.ParameterList(nn.Parameter(torch.zeros(num_latents)) for _ in range(num_layers))
        self.W_dec = nn.ParameterList(
            nn.Parameter(unit_rows((num_latents, num_layers - layer, d_model), generator) / (num_layers - layer))
            for layer in range(num_layers))
        self.b_dec = nn.Parameter(torch.zeros(num_layers, d_model))

    def decoder(self, layer: int) -> torch.Tensor:
        return self.W_dec[layer].transpose(0, 1)

    def encode(self, inputs: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The codes of layers 0, 1, ... from their MLP inputs (a prefix of the layers may be given)."""
        return [self.encode_layer(layer, x) for layer, x in enumerate(inputs)]

    def encode_layer(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s code alone: a replacement model encodes each layer's input
        as the forward pass reaches it (interpkernels.evaluation)."""
        return topk_encode(x, self.W_enc[layer], self.b_enc[layer], self.config["k"], backend=self.backend)

    def _contributions(self, source: int, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """``[L - source, ..., d]``: layer `source`'s code decoded to it and to every later layer."""
        return multi_target_decode(values, indices, self.decoder(source), backend=self.backend)

    def _combined(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Every layer's reconstruction (before b_dec) from this module's sums of contributions;
        a latent shard (interpkernels.distributed) adds up its ranks'."""
        return outputs

    def decode(self, codes: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Reconstructions of every layer's MLP output: sum over source layers l <= t."""
        outputs: list[torch.Tensor | None] = [None] * self.config["num_layers"]
        for source, (values, indices) in enumerate(codes):
            for offset, contribution in enumerate(self._contributions(source, values, indices).unbind(0)):
                target = source + offset
                outputs[target] = contribution if outputs[target] is None else outputs[target] + contribution
        return [out + self.b_dec[layer] for layer, out in enumerate(self._combined(outputs))]

    def forward(self, inputs: list[torch.Tensor], targets: list[torch.Tensor]) -> SparseCoderOutput:
        """FVU over all layers together; values/indices stacked ``[L, ..., k]``;
        no AuxK yet (``auxk_loss`` is 0)."""
        for layer, x in enumerate(inputs):
            v.require_rows(f"inputs[{layer}]", v.require_tensor(f"inputs[{layer}]", x))
        codes = self.encode(inputs)
        reconstructions = self.decode(codes)
        error = sum((out.float() - y.float()).square().sum() for out, y in zip(reconstructions, targets))
        variance = sum((y.float() - y.float().reshape(-1, y.shape[-1]).mean(0)).square().sum() for y in targets)
        fvu = error / variance
        values = torch.stack([v for v, _ in codes])
        indices = torch.stack([i for _, i in codes])
        l0 = (values > 0).sum(-1).float().mean()
        return SparseCoderOutput(torch.stack(reconstructions), values, indices, fvu, fvu.new_zeros(()), l0)


class JumpReLUCrossLayerTranscoder(CrossLayerTranscoder):
    """A cross-layer transcoder whose layer l codes ``f = pre * 1[pre > threshold[l]]``,
    the kind circuit-tracer publishes (a ReLU one has zero thresholds).
    ``threshold`` holds one ``[M]`` per layer, stored as is (loaded
    thresholds stay bit-exact) and non-negative (values come from
    ``relu(pre)``). At most ``k`` latents per token and layer are kept, the
    largest; ``k = num_latents`` keeps every latent above its threshold.
    ``forward``'s l0 counts active latents without a threshold gradient: this
    module is for reading trained ones (interpkernels.graphs), not for
    training their thresholds."""

    def __init__(self, num_layers: int, d_model: int, num_latents: int, k: int, *,
                 initial_threshold: float = 0.001, bandwidth: float = 0.001, seed: int | None = None):
        super().__init__(num_layers, d_model, num_latents, k, seed=seed)
        self.config.update(initial_threshold=initial_threshold, bandwidth=bandwidth)
        self.bandwidth = bandwidth
        self.threshold = nn.ParameterList(nn.Parameter(torch.full((num_latents,), float(initial_threshold)))
                                          for _ in range(num_layers))

    def encode_layer(self, layer, x):
        threshold = self.threshold[layer]
        candidates, indices = topk_encode(x, self.W_enc[layer], self.b_enc[layer], self.config["k"],
                                          threshold=threshold, backend=self.backend)
        return apply_threshold(candidates, indices, threshold, self.bandwidth), indices


MODULES = {cls.__name__: cls for cls in (TopKSAE, BatchTopKSAE, JumpReLUSAE, Transcoder, JumpReLUTranscoder,
                                          CrossLayerTranscoder, JumpReLUCrossLayerTranscoder)}
