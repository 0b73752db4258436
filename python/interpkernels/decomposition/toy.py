"""APD's toy model of superposition (Elhage et al. 2022; Braun et al. 2025, sec. 4.1):
5 sparse features squeezed through a 2-d bottleneck and read back,

    out = relu(W^T (W x) + b),   W [2, 5],   x_i ~ U(0, 1) with probability p, else 0,

built as two nn.Linear layers (``hidden`` with weight W, ``readout`` with W^T)
so that a decomposition can hook them. Its ground-truth mechanisms: feature i
uses W[:, i] e_i^T in ``hidden`` and e_i W[:, i]^T in ``readout``. A
decomposition recovers them when each is owned by one component:
``recovery`` reports, per true feature, the best cosine similarity of any
component's weights (both layers, flattened) with the mechanism's, and
whether those best components are all distinct.

    python -m interpkernels.decomposition.toy --plot components.png
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from interpkernels.decomposition.components import LinearComponents
from interpkernels.decomposition.train import APDConfig, train_apd


# The README's run: about the mean number of active features per token (5 x 0.05) as batch top-k.
TOY_CONFIG = APDConfig(steps=2000, learning_rate=1e-2, k=0.25, simplicity_weight=1e-2, log_every=250)


class ToyModelOfSuperposition(nn.Module):
    def __init__(self, W: torch.Tensor, b: torch.Tensor):
        super().__init__()
        n_hidden, n_features = W.shape
        self.hidden = nn.Linear(n_features, n_hidden, bias=False)
        self.readout = nn.Linear(n_hidden, n_features)
        with torch.no_grad():
            self.hidden.weight.copy_(W)
            self.readout.weight.copy_(W.T)
            self.readout.bias.copy_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.readout(self.hidden(x)))


def sparse_features(batch: int, n_features: int, probability: float, generator: torch.Generator) -> torch.Tensor:
    values = torch.rand(batch, n_features, generator=generator)
    return values * (torch.rand(batch, n_features, generator=generator) < probability)


def train_target(n_features: int = 5, n_hidden: int = 2, probability: float = 0.05, steps: int = 1000,
                 seed: int = 0) -> ToyModelOfSuperposition:
    """The target: tied W trained to reconstruct sparse features (its own generator, `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    W = nn.Parameter(torch.randn(n_hidden, n_features, generator=generator) * 0.5)
    b = nn.Parameter(torch.zeros(n_features))
    optimizer = torch.optim.Adam([W, b], lr=1e-2)
    for _ in range(steps):
        x = sparse_features(1024, n_features, probability, generator)
        loss = (torch.relu(x @ W.T @ W + b) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return ToyModelOfSuperposition(W.detach(), b.detach())


def true_mechanisms(model: ToyModelOfSuperposition) -> torch.Tensor:
    """``[n_features, 2 * n_hidden * n_features]``: feature i's weights in both layers, flattened."""
    W = model.hidden.weight.detach()
    n_features = W.shape[1]
    eye = torch.eye(n_features)
    hidden = torch.einsum("hi,ij->ihj", W, eye)  # column i of W only
    readout = torch.einsum("ij,hi->ijh", eye, W)  # row i of W^T only
    return torch.cat([hidden.reshape(n_features, -1), readout.reshape(n_features, -1)], 1)


def component_mechanisms(layers: dict[str, LinearComponents]) -> torch.Tensor:
    """``[C, ...]``: each component's weights in every layer, flattened and concatenated."""
    return torch.cat([layer.component_weights().detach().flatten(1) for layer in layers.values()], 1)


@dataclass
class Recovery:
    best_cosine: list[float]  # per true feature: the best cosine similarity of any component
    owner: list[int]  # per true feature: that component
    distinct_owners: bool

    @property
    def mean_best_cosine(self) -> float:
        return sum(self.best_cosine) / len(self.best_cosine)

    @property
    def recovered(self) -> bool:
        """Each true mechanism owned by its own component, at cosine >= 0.9."""
        return self.distinct_owners and min(self.best_cosine) >= 0.9

    def __str__(self) -> str:
        return (f"mean best cosine {self.mean_best_cosine:.3f} (min {min(self.best_cosine):.3f}), owners "
                f"{self.owner}{'' if self.distinct_owners else ' (shared)'}")


def recovery(model: ToyModelOfSuperposition, layers: dict[str, LinearComponents]) -> Recovery:
    truth = torch.nn.functional.normalize(true_mechanisms(model), dim=1)
    found = torch.nn.functional.normalize(component_mechanisms(layers), dim=1)
    best = (truth @ found.T).max(dim=1)
    owners = best.indices.tolist()
    return Recovery(best.values.tolist(), owners, len(set(owners)) == len(owners))


def decompose(model: ToyModelOfSuperposition, num_components: int = 5, *, probability: float = 0.05,
              config: APDConfig | None = None, seed: int = 1, batch: int = 256, init_scale: float = 1.0,
              progress: bool = True
              ) -> tuple[dict[str, LinearComponents], Recovery, Recovery]:
    """APD on the toy: (layers, recovery before training, after). The components and data come from
    `seed`'s generator, which must differ from the target's."""
    config = config or TOY_CONFIG
    generator = torch.Generator().manual_seed(seed)
    layers = {name: LinearComponents(getattr(model, name), num_components, generator=generator, init_scale=init_scale)
              for name in ("hidden", "readout")}
    before = recovery(model, layers)
    n_features = model.hidden.weight.shape[1]
    train_apd(model, layers, lambda: sparse_features(batch, n_features, probability, generator), config,
              generator=generator, progress=progress)
    return layers, before, recovery(model, layers)


def plot(model: ToyModelOfSuperposition, layers: dict[str, LinearComponents], path: str, title: str = "") -> None:
    """Each true feature's column W[:, i] and each component's hidden-layer direction, in the 2-d bottleneck."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = model.hidden.weight.detach()
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    colors = plt.cm.tab10.colors
    for i in range(W.shape[1]):
        axes[0].arrow(0, 0, *W[:, i].tolist(), color=colors[i], width=0.01, length_includes_head=True)
        axes[0].annotate(f"feature {i}", W[:, i].tolist(), color=colors[i])
    axes[0].set_title("target: W[:, i] per feature")
    truth = torch.nn.functional.normalize(true_mechanisms(model), dim=1)
    found = torch.nn.functional.normalize(component_mechanisms(layers), dim=1)
    similarity = (found @ truth.T).numpy()
    image = axes[1].imshow(similarity, vmin=-1, vmax=1, cmap="RdBu")
    axes[1].set_xlabel("true feature mechanism")
    axes[1].set_ylabel("component")
    axes[1].set_title("cosine(component, mechanism)")
    figure.colorbar(image, ax=axes[1])
    for a in axes[:1]:
        a.set_aspect("equal")
        limit = float(W.norm(dim=0).max()) * 1.3
        a.set_xlim(-limit, limit)
        a.set_ylim(-limit, limit)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TOY_CONFIG.steps)
    parser.add_argument("--components", type=int, default=5)
    parser.add_argument("--plot", help="write the components-vs-features figure here (png)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 2 x 5 weights: threads would only wait at barriers
    started = time.perf_counter()
    model = train_target()
    config = dataclasses.replace(TOY_CONFIG, steps=args.steps)
    layers, before, after = decompose(model, args.components, config=config)
    print(f"before training: {before}\nafter training:  {after}\nrecovered: {after.recovered}  "
          f"({time.perf_counter() - started:.1f} s)")
    if args.plot:
        plot(model, layers, args.plot, f"APD on the toy model of superposition (seed 1), mean best cosine "
             f"{before.mean_best_cosine:.2f} at init -> {after.mean_best_cosine:.2f} trained\nowners {after.owner}"
             f"{'' if after.distinct_owners else ' (shared: not recovered)'}")


if __name__ == "__main__":
    main()
