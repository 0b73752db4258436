"""component_attribution: APD's attribution of each token's output to each parameter component.

    rank 1  (h [..., C],    U [C, d]):    A[n, c] = sum_o (h[n,c] * (U[c] . G[n,o]))^2
    rank m  (h [..., C, m], B [C, m, d]): A[n, c] = sum_o (sum_r h[n,c,r] * (B[c,r] . G[n,o]))^2

G [..., O, d] holds, per token, the rows of the Jacobian of O outputs with
respect to the layer's output y (G[n, o] = d f_o / d y[n]); interpkernels.
decomposition.output_jacobian_rows gets them with one batched backward.

A component spans every decomposed layer (APD: one parameter vector over all
of them), so with several layers l (sequences of h, U, G) the layers' terms
add before the square, as in APD's calc_grad_attributions:

    A[n, c] = sum_o (sum_l s_l[n,o,c])^2,   s_l[n,o,c] = sum_r h_l[n,c,r] (B_l[c,r] . G_l[n,o]).

The kernels (csrc/cpu/component_attribution.cpp, triton_kernels/) never store
[N, O, C]. The C++ schema is in csrc/ops.cpp: lists of h [N, C, m_l],
B [C, m_l, d_l], G [N, O, d_l], one entry per layer.

The backward, with s[n,o,c] = sum_l s_l[n,o,c], P_l[n,o,c,r] = B_l[c,r] . G_l[n,o]
and g = grad_out:
    grad_h_l[n,c,r] = 2 g[n,c] sum_o s[n,o,c] P_l[n,o,c,r]
    grad_B_l[c,r]   = 2 sum_{n,o} g[n,c] h_l[n,c,r] s[n,o,c] G_l[n,o]
    grad_G_l[n,o]   = 2 sum_{c,r} g[n,c] s[n,o,c] h_l[n,c,r] B_l[c,r]
It is written in torch ops over blocks of tokens, so that [N, O, C, m] is only
held a block at a time; being torch ops, it is itself differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from interpkernels import _validation as v
from interpkernels import reference
from interpkernels._backends import resolve
from interpkernels.ops._kernels import NATIVE, TRITON, Kernels, kernels

# Entries of [tokens, O, C, m] the backward holds at once (16 MiB of float32).
_BACKWARD_BLOCK_ENTRIES = 1 << 22

TensorOrLayers = torch.Tensor | Sequence[torch.Tensor]


def component_attribution(
    h: TensorOrLayers, U: TensorOrLayers, G: TensorOrLayers, *, backend: str | None = None
) -> torch.Tensor:
    """APD attributions ``[..., C]`` of components to the O outputs whose Jacobian rows G holds.

    Args:
        h: component activations, ``[..., C]`` (rank 1) or ``[..., C, m]`` (rank m); or a
            sequence of them, one per decomposed layer.
        U: components, ``[C, d]`` (rank 1: the output directions U[c]) or ``[C, m, d]`` (rank m: B);
            a sequence, one per layer, when h is one.
        G: ``[..., O, d]`` output-Jacobian rows at the layer, same leading shape as h; a sequence,
            one per layer, when h is one.
        backend: which implementation runs (interpkernels._backends).

    Returns ``[..., C]`` in h's dtype, differentiable in h, U and G. This is
    APD's ``calc_grad_attributions`` (which omits the square root and the 1/O;
    rankings are unchanged). With several layers their terms add before the
    square (a component spans every layer); summing one call per layer would
    square each layer's term apart, which is not APD's attribution.
    """
    layered = not isinstance(h, torch.Tensor)
    hs, Us, Gs = _layer_sequences(h, U, G) if layered else ([h], [U], [G])
    L = len(hs)
    # Error messages name an argument, or its entry for one layer.
    names = {key: [f"{key}[{l}]" if layered else key for l in range(L)] for key in ("h", "U", "G")}
    leading, C, O = _check_layers(hs, Us, Gs, names)
    device = hs[0].device
    tensors = v.autocast_inputs(device, *hs, *Us, *Gs)
    hs, Us, Gs = list(tensors[:L]), list(tensors[L:2 * L]), list(tensors[2 * L:])
    v.require_same_dtype(names["h"][0], hs[0], **dict(zip(names["h"] + names["U"] + names["G"], tensors)))
    backend = resolve("component_attribution", backend, device)
    if backend == "torch":
        return reference.component_attribution(hs, Us, Gs)

    N = math.prod(leading)
    Bs = [U_layer.unsqueeze(1) if U_layer.dim() == 2 else U_layer for U_layer in Us]
    out = kernels(backend).component_attribution(
        [h_layer.reshape(N, C, B.shape[1]) for h_layer, B in zip(hs, Bs)], Bs,
        [G_layer.reshape(N, O, G_layer.shape[-1]) for G_layer in Gs])
    return out.view(*leading, C)


def _layer_sequences(h, U, G) -> tuple[list, list, list]:
    """h, U and G as lists of one entry per layer: as many of each, at least one."""
    if not isinstance(h, Sequence) or isinstance(h, str):
        raise TypeError(f"h: expected a torch.Tensor or a sequence of them (one per layer), got {type(h).__name__}")
    if len(h) == 0:
        raise ValueError("h: expected at least one layer, got an empty sequence")
    for name, value in (("U", U), ("G", G)):
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != len(h):
            raise (ValueError if isinstance(value, Sequence) else TypeError)(
                f"{name}: expected a sequence of {len(h)} tensors (one per layer, as h), got "
                f"{f'{len(value)} entries' if isinstance(value, Sequence) else type(value).__name__}")
    return list(h), list(U), list(G)


def _check_layers(hs, Us, Gs, names) -> tuple[torch.Size, int, int]:
    """Each layer's shapes, against the first layer's leading dims, C and O: (leading dims, C, O)."""
    leading = C = O = None
    for l, (h, U, G) in enumerate(zip(hs, Us, Gs)):
        h_name, U_name, G_name = names["h"][l], names["U"][l], names["G"][l]
        v.require_float(h_name, h, hs[0].device if l else None)
        v.require_float(U_name, U, h.device)
        v.require_float(G_name, G, h.device)
        if U.dim() not in (2, 3) or (C is not None and U.shape[0] != C):
            expected_C = "C" if C is None else f"C = {C} (that of layer 0)"
            raise ValueError(f"{U_name}: expected shape [{expected_C}, d] (rank 1) or [{expected_C}, m, d] (rank m), "
                             f"got {v.describe(U)}")
        C, d = U.shape[0], U.shape[-1]
        component_shape = (C,) if U.dim() == 2 else (C, U.shape[1])
        component_text = f"[..., C] = [..., {C}]" if U.dim() == 2 else f"[..., C, m] = [..., {C}, {U.shape[1]}]"
        layer_leading = h.shape[: h.dim() - len(component_shape)]
        if (h.dim() < len(component_shape) + 1 or tuple(h.shape[h.dim() - len(component_shape):]) != component_shape
                or (leading is not None and layer_leading != leading)):
            same = "" if leading is None else f" with leading dims {list(leading)} (those of {names['h'][0]})"
            raise ValueError(f"{h_name}: expected shape {component_text} (from {U_name}){same}, got {v.describe(h)}")
        leading = layer_leading
        if (G.dim() != len(leading) + 2 or G.shape[:-2] != leading or G.shape[-1] != d
                or (O is not None and G.shape[-2] != O)):
            expected_O = "O" if O is None else f"{O} (O of {names['G'][0]})"
            raise ValueError(f"{G_name}: expected shape [..., O, d] = [{', '.join(map(str, leading))}, {expected_O}, "
                             f"{d}] (leading dims of {h_name}, d of {U_name}), got {v.describe(G)}")
        O = G.shape[-2]
        v.require_same_device(names["h"][0], hs[0], **{h_name: h, U_name: U, G_name: G})
    return leading, C, O


def _component_attribution_fake(h, B, G):
    return h[0].new_empty(h[0].shape[0], h[0].shape[1])


def _setup(ctx, inputs, output):
    h, B, G = inputs
    ctx.num_layers = len(h)
    ctx.save_for_backward(*h, *B, *G)


def component_attribution_backward(ctx, grad_out):
    """The module docstring's gradients, a block of tokens at a time, in float32 (float64 for float64)."""
    L = ctx.num_layers
    saved = ctx.saved_tensors
    hs, Bs, Gs = saved[:L], saved[L:2 * L], saved[2 * L:]
    need_h, need_B, need_G = ctx.needs_input_grad
    N, C = hs[0].shape[:2]
    O = Gs[0].shape[1]
    compute_dtype = torch.float64 if hs[0].dtype == torch.float64 else torch.float32
    ranks = [h.shape[2] for h in hs]
    B_rows = [B.to(compute_dtype).reshape(C * m, B.shape[2]) for B, m in zip(Bs, ranks)]
    block = max(1, _BACKWARD_BLOCK_ENTRIES // max(1, O * C * sum(ranks)))
    grad_h_blocks = [[] for _ in range(L)]
    grad_G_blocks = [[] for _ in range(L)]
    grad_B_rows = [torch.zeros_like(rows) if need else None for rows, need in zip(B_rows, need_B)]
    for start in range(0, N, block):
        h_blocks = [h[start:start + block].to(compute_dtype) for h in hs]
        G_blocks = [G[start:start + block].to(compute_dtype) for G in Gs]
        tokens = h_blocks[0].shape[0]
        projections = [(G_block @ rows.T).view(tokens, O, C, m)
                       for G_block, rows, m in zip(G_blocks, B_rows, ranks)]
        weighted_sum = sum((p * h_block.unsqueeze(1)).sum(-1) for p, h_block in zip(projections, h_blocks))  # s
        grad_s = 2 * weighted_sum * grad_out[start:start + block].to(compute_dtype).unsqueeze(1)
        for l in range(L):
            if need_h[l]:
                grad_h_blocks[l].append((grad_s.unsqueeze(-1) * projections[l]).sum(1))
            if need_B[l] or need_G[l]:
                grad_projections = (grad_s.unsqueeze(-1) * h_blocks[l].unsqueeze(1)).reshape(tokens, O, C * ranks[l])
                if need_B[l]:
                    grad_B_rows[l] = grad_B_rows[l] + (grad_projections.reshape(tokens * O, C * ranks[l]).T
                                                       @ G_blocks[l].reshape(-1, G_blocks[l].shape[-1]))
                if need_G[l]:
                    grad_G_blocks[l].append(grad_projections @ B_rows[l])
    grad_h = [_gathered(blocks, h) if need else None for blocks, h, need in zip(grad_h_blocks, hs, need_h)]
    grad_B = [rows.view(B.shape).to(B.dtype) if need else None for rows, B, need in zip(grad_B_rows, Bs, need_B)]
    grad_G = [_gathered(blocks, G) if need else None for blocks, G, need in zip(grad_G_blocks, Gs, need_G)]
    return grad_h, grad_B, grad_G


def _gathered(blocks: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The token blocks of one gradient, joined, in the dtype of ``like`` (zeros when there are no tokens)."""
    return torch.cat(blocks).to(like.dtype) if blocks else torch.zeros_like(like)


def _register(ops: Kernels) -> None:
    torch.library.register_fake(ops.component_attribution, _component_attribution_fake)
    torch.library.register_autograd(ops.component_attribution, component_attribution_backward, setup_context=_setup)


_register(NATIVE)
_register(TRITON)
