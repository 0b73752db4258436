"""The first training step whose loss (or parameters) went non-finite, watched on
the device so that watching costs no host sync; a loop reads it (one sync)
only where it waits for the device anyway. Shared by interpkernels.train and
the APD/SPD loop (interpkernels.decomposition.train)."""

from __future__ import annotations

import torch


class NonFiniteWatch:
    def __init__(self, steps: int, device: torch.device | str = "cpu"):
        self.never = steps + 1  # the value of `first` while every step was finite
        self.first = torch.tensor(self.never, device=device)

    def loss(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.minimum(self.first, torch.where(loss.detach().isfinite(), self.never, step))

    def parameters(self, parameters: list[torch.Tensor], step: int) -> None:
        finite = torch.stack([p.detach().isfinite().all() for p in parameters]).all()
        self.first = torch.where(finite, self.first, self.first.clamp(max=step))
