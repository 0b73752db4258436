"""APD's toy model of superposition (Elhage et al. 2022; Braun et al. 2025, sec. 4.1):
5 sparse features squeezed through a 2-d bottleneck and read back,

    out = relu(W^T (W x) + b),   W [2, 5],   x_i ~ U(0, 1) with probability p, else 0,

built as two nn.Linear layers (``hidden`` with weight W, ``readout`` with W^T)
so that a decomposition can hook them. Its ground-truth mechanisms: feature i
uses W[:, i] e_i^T in ``hidden`` and e_i W[:, i]^T in ``readout``. A
decomposition recovers them when each is carried whole by a component of its
own and by no other: ``recovery`` reports, per true feature, the component
carrying most of its mechanism (both layers' weights, flattened), that
component's cosine similarity with it and the share of it that component and
the next one carry (the thresholds are above ``Recovery``).

The weights are tied, so are the components (TransposedLinearComponents):
component c is P_c in ``hidden`` and P_c^T in ``readout``, as in APD's and
SPD's own TMS runs. The guide's run (docs/decomposition.md) is SPD (TOY_CONFIG); APD (an APDConfig)
runs on the same toy but does not recover it (same guide).

    python -m interpkernels.decomposition.toy --plot components.png
    python -m interpkernels.decomposition.toy --target-seeds 0 1 2 3 --seeds 1 2 3  # the guide's table
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from interpkernels.decomposition.components import LinearComponents, TransposedLinearComponents
from interpkernels.decomposition.spd import CausalImportance, SPDConfig, train_spd
from interpkernels.decomposition.train import APDConfig, train_apd

# The guide's run: SPD's TMS 5-2 settings (C = 20, importance weight 3e-3, p = 1, gates of 16
# neurons, output MSE: reconstruction_loss / 5 outputs), with a larger learning rate and fewer
# steps than SPD's 1e-3 x 40k so that it runs in about half a minute on a CPU. Two parallel
# components sharing a feature merge only slowly (both gates stay open, and only a gate that
# closes lets one of them shrink), so the steps matter more than the tokens:
# 5000 steps of 512 tokens recovered all 4 runs on seeds held out from the guide's table
# (targets 4, 5 x seeds 4, 5), where 2500 steps recovered 1 (4000 of 1024 at 1e-2: 5 of the 12).
TOY_CONFIG = SPDConfig(steps=5000, learning_rate=2e-2, reconstruction_weight=0.2, importance_weight=3e-3,
                       importance_p=1.0, log_every=500)
TOY_COMPONENTS = 20
TOY_BATCH = 512


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


# What "recovered" means (docs/decomposition.md). A component's share of a mechanism m is the part of m it
# carries: its weights projected on m's direction, over m's norm, <w, m> / |m|^2 (1: all of m;
# two parallel halves: 0.5 each; negative: against m). A mechanism is owned by the component
# with the largest share, and recovered when that owner is a whole copy of it (cosine >=
# MIN_COSINE, share within 1 +- SHARE_TOLERANCE), owns no other mechanism, and no other
# component carries SPLIT_SHARE or more of it, either way (else it is split).
MIN_COSINE = 0.9
SHARE_TOLERANCE = 0.1
SPLIT_SHARE = 0.1


@dataclass
class Recovery:
    """Per true mechanism (feature): its owner and how much of it the owner and the runner-up carry."""
    owner: list[int]  # the component with the largest share
    cosine: list[float]  # the owner's cosine similarity with the mechanism
    share: list[float]  # the owner's share
    runner_up: list[int]  # the other component with the largest |share|
    runner_up_share: list[float]

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosine) / len(self.cosine)

    @property
    def shared(self) -> list[int]:
        """Mechanisms whose owner owns another mechanism too."""
        return [i for i, c in enumerate(self.owner) if self.owner.count(c) > 1]

    @property
    def split(self) -> list[int]:
        """Mechanisms of which a second component carries SPLIT_SHARE or more."""
        return [i for i, share in enumerate(self.runner_up_share) if abs(share) >= SPLIT_SHARE]

    @property
    def unowned(self) -> list[int]:
        """Mechanisms without a whole copy: the owner's cosine < MIN_COSINE or its share off 1 by more
        than SHARE_TOLERANCE."""
        return [i for i, (cosine, share) in enumerate(zip(self.cosine, self.share))
                if cosine < MIN_COSINE or abs(share - 1) > SHARE_TOLERANCE]

    @property
    def recovered(self) -> bool:
        """Every true mechanism has its own component, a whole copy of it, and no second one."""
        return not (self.shared or self.split or self.unowned)

    @property
    def verdict(self) -> str:
        """'recovered', or 'not recovered (split 1; shared 0, 2)': the failing mechanisms by kind."""
        failures = [f"{kind} {', '.join(map(str, mechanisms))}"
                    for kind, mechanisms in (("split", self.split), ("shared", self.shared), ("unowned", self.unowned))
                    if mechanisms]
        return "recovered" if not failures else f"not recovered ({'; '.join(failures)})"

    def __str__(self) -> str:
        rows = [f"  feature {i}: component {self.owner[i]:2d} cosine {self.cosine[i]:.3f} carries "
                f"{self.share[i]:.2f}; next component {self.runner_up[i]:2d} carries {self.runner_up_share[i]:.2f}"
                for i in range(len(self.owner))]
        return "\n".join([f"mean owner cosine {self.mean_cosine:.3f} (lowest {min(self.cosine):.3f}): {self.verdict}",
                          *rows])


def recovery(model: ToyModelOfSuperposition, layers: dict[str, LinearComponents]) -> Recovery:
    truth = true_mechanisms(model)
    found = component_mechanisms(layers)
    shares = truth @ found.T / truth.square().sum(1, keepdim=True)  # [mechanism, component]
    cosines = torch.nn.functional.normalize(truth, dim=1) @ torch.nn.functional.normalize(found, dim=1).T
    owner = shares.argmax(1)
    others = shares.abs().scatter(1, owner[:, None], -1.0)  # the owner excluded
    runner_up = others.argmax(1)
    return Recovery(owner.tolist(), cosines.gather(1, owner[:, None]).squeeze(1).tolist(),
                    shares.gather(1, owner[:, None]).squeeze(1).tolist(), runner_up.tolist(),
                    shares.gather(1, runner_up[:, None]).squeeze(1).tolist())


def decompose(model: ToyModelOfSuperposition, num_components: int = TOY_COMPONENTS, *, probability: float = 0.05,
              config: SPDConfig | APDConfig | None = None, seed: int = 1, batch: int = TOY_BATCH,
              init_scale: float = 1.0, progress: bool = True
              ) -> tuple[dict[str, LinearComponents], Recovery, Recovery]:
    """SPD (an SPDConfig, the default TOY_CONFIG) or APD (an APDConfig) on the toy, with tied
    components: (layers, recovery before training, after). The components, gates and data come
    from `seed`'s generator, which must differ from the target's."""
    config = config or TOY_CONFIG
    generator = torch.Generator().manual_seed(seed)
    hidden = LinearComponents(model.hidden, num_components, generator=generator, init_scale=init_scale)
    layers = {"hidden": hidden, "readout": TransposedLinearComponents(model.readout, hidden)}
    before = recovery(model, layers)
    n_features = model.hidden.weight.shape[1]

    def batches():
        return sparse_features(batch, n_features, probability, generator)

    if isinstance(config, SPDConfig):
        gates = {name: CausalImportance(num_components, config.gate_hidden, generator=generator) for name in layers}
        train_spd(model, layers, gates, batches, config, generator=generator, progress=progress)
    else:
        train_apd(model, layers, batches, config, generator=generator, progress=progress)
    return layers, before, recovery(model, layers)


def plot(model: ToyModelOfSuperposition, layers: dict[str, LinearComponents], path: str, title: str = "") -> None:
    """Left: each true feature's column W[:, i] (solid) and the column i of its owner's hidden-layer
    weight (dashed), in the 2-d bottleneck. Middle: cosine(component, mechanism). Right: each
    component's weight norm (both layers), owners in colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    W = model.hidden.weight.detach()
    found_recovery = recovery(model, layers)
    owner_weights = layers["hidden"].component_weights().detach()  # [C, 2, 5]
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.8), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    colors = plt.cm.tab10.colors
    for i in range(W.shape[1]):
        axes[0].arrow(0, 0, *W[:, i].tolist(), color=colors[i], width=0.012, length_includes_head=True)
        owned = owner_weights[found_recovery.owner[i], :, i].tolist()
        axes[0].plot([0, owned[0]], [0, owned[1]], color=colors[i], linestyle="--", linewidth=2.5, alpha=0.7)
        axes[0].annotate(f"feature {i}", W[:, i].tolist(), color=colors[i])
    axes[0].set_title("W[:, i] (solid), owner component's column i (dashed)")
    axes[0].set_aspect("equal")
    limit = float(W.norm(dim=0).max()) * 1.3
    axes[0].set_xlim(-limit, limit)
    axes[0].set_ylim(-limit, limit)
    truth = torch.nn.functional.normalize(true_mechanisms(model), dim=1)
    weights = component_mechanisms(layers)
    similarity = (torch.nn.functional.normalize(weights, dim=1) @ truth.T).numpy()
    image = axes[1].imshow(similarity, vmin=-1, vmax=1, cmap="RdBu", aspect="auto")
    axes[1].set_xlabel("true feature mechanism")
    axes[1].set_ylabel("component")
    axes[1].set_yticks(range(0, weights.shape[0], 2))
    axes[1].set_title("cosine(component, mechanism)")
    figure.colorbar(image, ax=axes[1])
    norms = weights.norm(dim=1).tolist()
    bar_colors = ["lightgray"] * len(norms)
    for i, c in enumerate(found_recovery.owner):
        bar_colors[c] = colors[i]
    axes[2].bar(range(len(norms)), norms, color=bar_colors)
    axes[2].set_xlabel("component")
    axes[2].set_title("component weight norm (owners coloured)")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=TOY_CONFIG.steps)
    parser.add_argument("--learning-rate", type=float, default=TOY_CONFIG.learning_rate)
    parser.add_argument("--batch", type=int, default=TOY_BATCH, help="tokens per step")
    parser.add_argument("--components", type=int, default=TOY_COMPONENTS)
    parser.add_argument("--target-seeds", type=int, nargs="+", default=[0], help="the targets' generators")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1],
                        help="the generators of the components, gates and data (one run per target and seed)")
    parser.add_argument("--plot", help="write the components-vs-features figure here (png; one run only)")
    args = parser.parse_args(argv)
    if args.plot and len(args.target_seeds) * len(args.seeds) > 1:
        parser.error("--plot: draws one run; give one target seed and one seed")
    torch.set_num_threads(1)  # 2 x 5 weights: threads would only wait at barriers
    config = dataclasses.replace(TOY_CONFIG, steps=args.steps, learning_rate=args.learning_rate)
    started = time.perf_counter()
    grid: dict[int, dict[int, Recovery]] = {}
    for target_seed in args.target_seeds:
        model = train_target(seed=target_seed)
        grid[target_seed] = {}
        for seed in args.seeds:
            run_started = time.perf_counter()
            layers, before, after = decompose(model, args.components, config=config, seed=seed, batch=args.batch)
            grid[target_seed][seed] = after
            print(f"target seed {target_seed}, seed {seed} ({time.perf_counter() - run_started:.1f} s)\n"
                  f"before training: {before}\nafter training:  {after}", flush=True)
    print(f"{sum(run.recovered for row in grid.values() for run in row.values())} of "
          f"{len(args.target_seeds) * len(args.seeds)} recovered ({time.perf_counter() - started:.1f} s)")
    if len(args.target_seeds) * len(args.seeds) > 1:
        print(recovery_table(grid))
    if args.plot:
        plot(model, layers, args.plot, f"SPD on the toy model of superposition (target seed {args.target_seeds[0]}, "
             f"seed {args.seeds[0]}): mean owner cosine {before.mean_cosine:.3f} at init -> "
             f"{after.mean_cosine:.3f} trained (lowest {min(after.cosine):.3f}, owner shares "
             f"{min(after.share):.2f}-{max(after.share):.2f})\n{after.verdict}, owners {after.owner}")


def recovery_table(grid: dict[int, dict[int, Recovery]]) -> str:
    """A markdown table, a row per target seed and a column per seed: the verdict, the lowest
    owner cosine and the owners' shares."""
    seeds = list(next(iter(grid.values())))
    lines = ["| target seed | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
             "| --- |" + " --- |" * len(seeds)]
    for target_seed, row in grid.items():
        cells = [f"{'**yes**' if run.recovered else run.verdict.removeprefix('not recovered ')}: cosine ≥ "
                 f"{min(run.cosine):.3f}, shares {min(run.share):.2f}–{max(run.share):.2f}, next ≤ "
                 f"{max(map(abs, run.runner_up_share)):.2f}" for run in row.values()]
        lines.append(f"| {target_seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
