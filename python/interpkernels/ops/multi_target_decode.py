"""multi_target_decode: one sparse code decoded toward several targets, as a
cross-layer transcoder decodes a layer's code to every later layer.

    out[t, n] = sum_j values[n, j] * W_dec[t, indices[n, j]] + bias[t]

With the decoder stored latent-major ([M, T, d] memory, exposed as the
[T, M, d] view docs/OPS.md names) this is a single sparse_decode of width T*d:
the code is read once, each latent's T rows are one contiguous gather, and
the weight gradient is one grouping and one reduction per latent. A decoder
stored target-major is copied to that layout first (once per call).
"""

from __future__ import annotations

import torch

from interpkernels import _validation as v
from interpkernels.ops.sparse_decode import sparse_decode


def latent_major(W_dec: torch.Tensor) -> torch.Tensor:
    """[T, M, d] -> [M, T*d]; a view when W_dec is a transposed [M, T, d] tensor."""
    T, M, d = W_dec.shape
    return W_dec.transpose(0, 1).reshape(M, T * d)


def multi_target_decode(
    values: torch.Tensor,
    indices: torch.Tensor,
    W_dec: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Decode ``[..., k]`` codes with ``W_dec [T, M, d]`` (and ``bias [T, d]``) to
    ``[T, ..., d]``; ``backend`` picks the implementation of sparse_decode."""
    v.require_tensor("W_dec", W_dec)
    if W_dec.dim() != 3:
        raise ValueError(f"W_dec: expected shape [T, M, d], got {v.describe(W_dec)}")
    T, _, d = W_dec.shape
    if bias is not None:
        v.require_tensor("bias", bias)
        v.require_shape("bias", bias, (T, d), f"[T, d] = [{T}, {d}]")
        bias = bias.reshape(T * d)
    out = sparse_decode(values, indices, latent_major(W_dec), bias, backend=backend)
    return out.unflatten(-1, (T, d)).movedim(-2, 0)
