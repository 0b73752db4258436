"""Worked example with ground truth: attribution finds the SAE latents that carry the copied feature.

Task: a sequence of T tokens, each token an (attribute, nuisance) pair; the
model must output, at the last position, the *attribute of the first token*.
A one-layer attention + MLP model learns to copy it (the mechanism is known:
the last position attends to position 0 and reads its attribute). An SAE
trained on the residual stream after attention (interpkernels.train) learns
latents for the copied attribute. Ground truth: the latents whose decoder
row points along the copied attribute's direction (class-mean difference of the residual at the last
position, from the task's labels; no gradients, no attribution).

Clean and patched inputs differ only in the first token's attribute;
``interpkernels.attribution.attribute`` on the metric
``logit[a_clean] - logit[a_patched]`` must rank those carrier latents first.
The same check with the SAE before training is reported beside it.

    python examples/copy_attribution.py [--fast] [--plot docs/images/copy_attribution.png]

Three generators that never meet: the task's (data, ground truth), the
model's initial weights and the SAE's (interpkernels.nn hashes its seed).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from interpkernels.attribution import attribute
from interpkernels.nn import TopKSAE
from interpkernels.train import train

ATTRIBUTES, NUISANCES, LENGTH = 4, 6, 6
VOCAB = ATTRIBUTES * NUISANCES


def sample(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [n, LENGTH] (token = attribute * NUISANCES + nuisance) and labels: the first token's attribute."""
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    return tokens, tokens[:, 0] // NUISANCES


def with_first_attribute(tokens: torch.Tensor, attribute_: int) -> torch.Tensor:
    """The same sequences with the first token's attribute set (its nuisance kept)."""
    out = tokens.clone()
    out[:, 0] = attribute_ * NUISANCES + tokens[:, 0] % NUISANCES
    return out


class CopyModel(nn.Module):
    """embed + position -> causal attention -> `attn_out` -> MLP -> `mlp_out` -> readout."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.position = nn.Parameter(torch.randn(LENGTH, d) / d ** 0.5)
        self.attention = nn.MultiheadAttention(d, 1, batch_first=True)
        self.attn_out = nn.Identity()  # the residual after attention: an SAE site
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.ReLU(), nn.Linear(4 * d, d))
        self.mlp_out = nn.Identity()  # the residual after the MLP: an SAE site
        self.readout = nn.Linear(d, ATTRIBUTES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        causal = torch.triu(torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool), 1)
        attended, _ = self.attention(x, x, x, attn_mask=causal, need_weights=False)
        x = self.attn_out(x + attended)
        x = self.mlp_out(x + self.mlp(x))
        return self.readout(x)  # [n, LENGTH, ATTRIBUTES]; the answer is read at the last position


def derived_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:8], "little")


def train_model(steps: int, seed: int, log=print) -> CopyModel:
    with torch.random.fork_rng():
        torch.manual_seed(derived_seed("copy_attribution.model", seed))
        model = CopyModel()
    data = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(1, steps + 1):
        tokens, labels = sample(256, data)
        loss = nn.functional.cross_entropy(model(tokens)[:, -1], labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % max(steps // 4, 1) == 0:
            log(f"  model step {step}/{steps}  loss {loss.item():.4f}")
    return model.eval()


def harvest(model: CopyModel, site: str, tokens: torch.Tensor) -> torch.Tensor:
    """Activations [n, LENGTH, d] at a site."""
    captured = []
    handle = dict(model.named_modules())[site].register_forward_hook(lambda m, a, out: captured.append(out))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    return captured[0]


def train_sae(activations: torch.Tensor, steps: int, seed: int) -> TopKSAE:
    rows = activations.reshape(-1, activations.shape[-1])
    sae = TopKSAE(rows.shape[1], 64, 4, seed=seed)
    order = torch.Generator().manual_seed(derived_seed("copy_attribution.batches", seed))

    def batches():
        while True:
            yield rows[torch.randint(0, len(rows), (512,), generator=order)]

    train(sae, batches(), steps=steps, lr=3e-3, progress=False, dead_after_tokens=50_000)
    return sae


def feature_directions(last_activations: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[A, d]: the copied attribute's direction in the residual at the last
    position, mean(x | attribute a) - mean(x), from the task's labels."""
    means = torch.stack([last_activations[labels == a].mean(0) for a in range(ATTRIBUTES)])
    return means - last_activations.mean(0)


def carriers(sae: TopKSAE, directions: torch.Tensor, min_cosine: float = 0.8) -> dict[int, int]:
    """Ground truth: latent -> the attribute whose direction its decoder row
    points along (cosine >= min_cosine)."""
    cosine = nn.functional.normalize(sae.W_dec.detach(), dim=1) @ nn.functional.normalize(directions, dim=1).T
    best, attribute_ = cosine.max(1)
    return {i: int(attribute_[i]) for i in range(sae.num_latents) if best[i] >= min_cosine}


@dataclass
class Outcome:
    accuracy: float
    fvu: float
    clean_attribute: int
    patched_attribute: int
    ranking: list[tuple[int, float]]  # (latent, summed score at the last position), best first
    carriers: dict[int, int]  # latent -> attribute
    ranking_untrained: list[tuple[int, float]]
    carriers_untrained: dict[int, int]
    scores: torch.Tensor  # [M] summed last-position scores of the trained SAE
    scores_untrained: torch.Tensor  # [M] the same for the SAE before training
    metric_clean: float
    metric_patched: float

    def top_carry(self, n: int, trained: bool = True) -> int:
        """How many of the n top-ranked latents carry the clean or the patched attribute."""
        ranking, truth = (self.ranking, self.carriers) if trained else (self.ranking_untrained,
                                                                        self.carriers_untrained)
        wanted = {self.clean_attribute, self.patched_attribute}
        return sum(truth.get(latent) in wanted for latent, _ in ranking[:n])


def last_position_ranking(model, sae, clean, patched, metric) -> tuple[list[tuple[int, float]], torch.Tensor, object]:
    result = attribute(model, {"attn_out": sae}, clean, patched, metric)
    scores = result.nodes["attn_out"].latents.to_dense()[:, -1].sum(0)  # the copied answer lives at the last position
    order = scores.abs().argsort(descending=True)
    return [(int(i), float(scores[i])) for i in order], scores, result


def run(model_steps: int = 1500, sae_steps: int = 1500, seed: int = 0, clean_attribute: int = 1,
        patched_attribute: int = 2, log=print) -> Outcome:
    started = time.perf_counter()
    log(f"training the copy model ({model_steps} steps)")
    model = train_model(model_steps, seed, log)
    held_out = torch.Generator().manual_seed(derived_seed("copy_attribution.held_out", seed))
    tokens, labels = sample(4096, held_out)
    with torch.no_grad():
        accuracy = float((model(tokens)[:, -1].argmax(-1) == labels).float().mean())
    log(f"  accuracy {accuracy:.3f}")
    activations = harvest(model, "attn_out", tokens)
    untrained = TopKSAE(activations.shape[-1], 64, 4, seed=seed)
    log(f"training the SAE at attn_out ({sae_steps} steps)")
    sae = train_sae(activations, sae_steps, seed)
    with torch.no_grad():
        fvu = float(sae(activations.reshape(-1, activations.shape[-1])).fvu)
    log(f"  fvu {fvu:.3f}")

    base, _ = sample(64, torch.Generator().manual_seed(derived_seed("copy_attribution.pairs", seed)))
    clean = with_first_attribute(base, clean_attribute)
    patched = with_first_attribute(base, patched_attribute)

    def metric(logits):
        return logits[:, -1, clean_attribute] - logits[:, -1, patched_attribute]

    ranking, scores, result = last_position_ranking(model, sae, clean, patched, metric)
    ranking_untrained, scores_untrained, _ = last_position_ranking(model, untrained, clean, patched, metric)
    directions = feature_directions(activations[:, -1], labels)
    outcome = Outcome(accuracy, fvu, clean_attribute, patched_attribute, ranking, carriers(sae, directions),
                      ranking_untrained, carriers(untrained, directions), scores, scores_untrained,
                      result.metric_clean, result.metric_patched)
    log(f"metric clean {outcome.metric_clean:.1f}, patched {outcome.metric_patched:.1f}")
    for rank, (latent, score) in enumerate(ranking[:5], 1):
        log(f"  #{rank} latent {latent:2d}  score {score:8.2f}  carries attribute {outcome.carriers.get(latent, '-')}")
    log(f"top 2 latents carrying attribute {clean_attribute} or {patched_attribute}: trained SAE "
        f"{outcome.top_carry(2)}/2, the same SAE before training {outcome.top_carry(2, trained=False)}/2 "
        f"({time.perf_counter() - started:.0f} s)")
    return outcome


def plot(outcome: Outcome, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colours = {outcome.clean_attribute: "tab:blue", outcome.patched_attribute: "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
    panels = [(outcome.scores, outcome.carriers, f"trained SAE (fvu {outcome.fvu:.3f})"),
              (outcome.scores_untrained, outcome.carriers_untrained, "the same SAE before training")]
    for ax, (scores, truth, title) in zip(axes, panels):
        ax.bar(range(len(scores)), scores.numpy(),
               color=[colours.get(truth.get(i), "tab:green" if i in truth else "tab:gray")
                      for i in range(len(scores))])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("SAE latent at attn_out")
    axes[0].set_ylabel("AtP score at the last position\n(summed over 64 pairs)")
    handles = [Patch(color=c, label=f"points along copied attribute {a}") for a, c in colours.items()]
    handles += [Patch(color="tab:green", label="points along another attribute"),
                Patch(color="tab:gray", label="other latents")]
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(f"metric logit[{outcome.clean_attribute}] - logit[{outcome.patched_attribute}]: "
                 f"clean {outcome.metric_clean:.0f}, patched {outcome.metric_patched:.0f}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the test suite's short run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the score plot here (needs matplotlib)")
    args = parser.parse_args(argv)
    steps = dict(model_steps=200, sae_steps=300) if args.fast else {}
    outcome = run(seed=args.seed, **steps)
    if args.plot:
        plot(outcome, args.plot)
    return 0 if outcome.top_carry(2) == 2 else 1


if __name__ == "__main__":
    sys.exit(main())
