"""LinearComponents: a target nn.Linear's weight split into C parameter components.

    rank 1:  W ~ sum_c U[c] (x) V[:, c],   V [d_in, C], U [C, d_out],        h = x @ V        [..., C]
    rank m:  W ~ sum_c A[c] B[c],          A [C, d_in, m], B [C, m, d_out],  h[..,c,:] = x @ A[c]  [..., C, m]

(SPEC section 5 layouts; W = target.weight is [d_out, d_in], so the
components' weight is (V U)^T.) The target stays frozen inside as buffers.
The forward modes are the ops': all components (``forward``), a top-k code
(``topk_forward``: sparse_decode on gathered h) and SPD's dense mask
(``masked_forward``: masked_component_forward, with the weight delta).
"""

from __future__ import annotations

import torch
from torch import nn

from interpkernels import _validation as v
from interpkernels.decomposition.selection import component_forward
from interpkernels.ops.masked_component_forward import masked_component_forward


class LinearComponents(nn.Module):
    def __init__(self, target: nn.Linear, num_components: int, rank: int = 1, *,
                 generator: torch.Generator | None = None, init_scale: float = 1.0) -> None:
        """Components of ``target`` (copied and frozen), initialised from ``generator``
        (never the one that made the target): V, A ~ N(0, s^2/d_in), U, B ~ N(0, s^2/(C m)), s = init_scale."""
        super().__init__()
        if not isinstance(target, nn.Linear):
            raise TypeError(f"target: expected an nn.Linear, got {type(target).__name__}")
        self.num_components = v.require_count("num_components", num_components, 1, 1 << 24, "2^24")
        self.rank = v.require_count("rank", rank, 1, 1 << 16, "2^16")
        d_out, d_in = target.weight.shape
        weight = target.weight.detach()
        self.register_buffer("target_weight", weight.clone())
        self.register_buffer("target_bias", None if target.bias is None else target.bias.detach().clone())

        def draw(*shape, scale):
            return torch.randn(*shape, generator=generator, dtype=weight.dtype).to(weight.device) * scale * init_scale

        if rank == 1:
            self.V = nn.Parameter(draw(d_in, num_components, scale=d_in**-0.5))
            self.U = nn.Parameter(draw(num_components, d_out, scale=num_components**-0.5))
        else:
            self.V = nn.Parameter(draw(num_components, d_in, rank, scale=d_in**-0.5))  # A
            self.U = nn.Parameter(draw(num_components, rank, d_out, scale=(num_components * rank) ** -0.5))  # B

    def component_acts(self, x: torch.Tensor) -> torch.Tensor:
        """h: ``[..., C]`` (rank 1) or ``[..., C, m]``."""
        return x @ self.V if self.rank == 1 else torch.einsum("...i,cim->...cm", x, self.V)

    def component_weights(self) -> torch.Tensor:
        """Each component's weight ``[C, d_out, d_in]`` (for small layers: metrics and plots)."""
        if self.rank == 1:
            return torch.einsum("ic,co->coi", self.V, self.U)
        return torch.einsum("cim,cmo->coi", self.V, self.U)

    def weight(self) -> torch.Tensor:
        """The components' sum, ``[d_out, d_in]`` like the target's."""
        if self.rank == 1:
            return (self.V @ self.U).T
        return torch.einsum("cim,cmo->oi", self.V, self.U)

    def weight_delta(self) -> torch.Tensor:
        """W_target - sum of components: what faithfulness drives to zero."""
        return self.target_weight - self.weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """All components: ``h @ U + b``."""
        h = self.component_acts(x)
        out = h @ self.U if self.rank == 1 else torch.einsum("...cm,cmo->...o", h, self.U)
        return out if self.target_bias is None else out + self.target_bias

    def topk_forward(self, x: torch.Tensor, indices: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Only the components in ``indices [..., k]`` (those with ``keep``), via sparse_decode."""
        return component_forward(self.component_acts(x), self.U, indices, self.target_bias, keep=keep)

    def masked_forward(self, x: torch.Tensor, mask: torch.Tensor, delta_mask: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """SPD: components scaled by ``mask [..., C]``; with ``delta_mask [...]`` the weight delta
        joins, scaled by it."""
        return masked_component_forward(
            x, self.component_acts(x), mask, self.U,
            W_delta=None if delta_mask is None else self.weight_delta(), delta_mask=delta_mask, bias=self.target_bias)


class TransposedLinearComponents(LinearComponents):
    """The components of a layer whose target weight is the transpose of another's (tied
    weights, as in the toy model of superposition), sharing that layer's parameters:
    component c here is ``P_c^T``, i.e. ``V = source.U^T`` and ``U = source.V^T``
    (rank m: A[c] = B_source[c]^T, B[c] = A_source[c]^T). Component c is then one
    mechanism across both layers, trained once (APD and SPD decompose tied TMS this way)."""

    def __init__(self, target: nn.Linear, source: LinearComponents) -> None:
        nn.Module.__init__(self)  # no parameters of its own: V and U are views of source's
        if not isinstance(target, nn.Linear):
            raise TypeError(f"target: expected an nn.Linear, got {type(target).__name__}")
        if not isinstance(source, LinearComponents):
            raise TypeError(f"source: expected LinearComponents, got {type(source).__name__}")
        if tuple(target.weight.shape) != tuple(source.target_weight.T.shape):
            raise ValueError(f"target: expected a weight of shape {list(source.target_weight.T.shape)} "
                             f"(the transpose of source's), got {list(target.weight.shape)}")
        self.num_components, self.rank = source.num_components, source.rank
        self.register_buffer("target_weight", target.weight.detach().clone())
        self.register_buffer("target_bias", None if target.bias is None else target.bias.detach().clone())
        # Not a submodule: its parameters belong to (and are trained and counted with) source.
        object.__setattr__(self, "source", source)

    @property
    def V(self) -> torch.Tensor:
        return self.source.U.T if self.rank == 1 else self.source.U.transpose(1, 2)

    @property
    def U(self) -> torch.Tensor:
        return self.source.V.T if self.rank == 1 else self.source.V.transpose(1, 2)
