"""Attribution scores against what they estimate: the real model's response to a patch.

On a trained two-block transformer (causal attention, LayerNorm, MLP) with
trained TopK SAEs at both blocks' outputs, in float64:

- IG's completeness at the *upstream* site: its latent and error scores add
  up to ``metric(model with blocks.0's output patched) - metric(clean)``, the
  real model's change (Sundararajan et al. 2017's completeness, up to the
  Riemann sum's error at 64 steps), with blocks.1 hooked too;
- a site's scores do not depend on which other sites are hooked;
- AtP per latent against the real effect of patching that latent alone
  (Kramar et al. 2024's check of AtP against activation patching).

The oracle is the model itself, run with a patched activation; nothing here
repeats the attribution code.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interpkernels.attribution import attribute
from interpkernels.nn import TopKSAE
from interpkernels.train import train

VOCAB, LENGTH, D = 8, 6, 32
SITES = ("blocks.0", "blocks.1")


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm_attention = nn.LayerNorm(d)
        self.attention = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        causal = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        h = self.norm_attention(x)
        x = x + self.attention(h, h, h, attn_mask=causal, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class TwoBlocks(nn.Module):
    def __init__(self, d: int = D):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.position = nn.Parameter(0.3 * torch.randn(LENGTH, d))
        self.blocks = nn.ModuleList(Block(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.norm(x))


def sequences(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, LENGTH), generator=generator)


def site_activations(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    captured = {}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(lambda m, a, out, name=name: captured.__setitem__(name, out))
               for name in SITES]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    return captured


@pytest.fixture(scope="module")
def trained():
    """The model learns to output the first token at the last position; an SAE per block output."""
    torch.manual_seed(0)
    model = TwoBlocks()
    data = torch.Generator().manual_seed(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        tokens = sequences(128, data)
        loss = nn.functional.cross_entropy(model(tokens)[:, -1], tokens[:, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    held_out = sequences(512, data)
    accuracy = (model(held_out)[:, -1].argmax(-1) == held_out[:, 0]).double().mean().item()
    rows = site_activations(model, sequences(4096, data))
    saes = {}
    for i, name in enumerate(SITES):
        x = rows[name].reshape(-1, D)
        sae = TopKSAE(D, 128, 8, seed=10 + i)
        order = torch.Generator().manual_seed(20 + i)

        def batches():
            while True:
                yield x[torch.randint(0, len(x), (512,), generator=order)]

        history = train(sae, batches(), steps=600, lr=3e-3, progress=False, dead_after_tokens=100_000)
        saes[name] = sae.double().eval()
        saes[name].fvu = history.fvu[-1]
    return model.double(), saes, accuracy


def prompts(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and patched inputs that differ in the first token only."""
    generator = torch.Generator().manual_seed(seed)
    clean = sequences(4, generator)
    patched = clean.clone()
    patched[:, 0] = (clean[:, 0] + 1 + torch.randint(0, VOCAB - 1, (4,), generator=generator)) % VOCAB
    return clean, patched


def metric_for(clean: torch.Tensor, patched: torch.Tensor):
    rows = torch.arange(len(clean))

    def metric(logits):
        return logits[rows, -1, clean[:, 0]] - logits[rows, -1, patched[:, 0]]

    return metric


def run_with_output(model: nn.Module, tokens: torch.Tensor, site: str, output: torch.Tensor) -> torch.Tensor:
    """The real model with `site`'s output replaced."""
    handle = dict(model.named_modules())[site].register_forward_hook(lambda m, a, out: output)
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        handle.remove()


def total(result, site: str) -> float:
    return float(result.nodes[site].latents.sum() + result.nodes[site].error)


def test_the_toy_is_trained(trained):
    model, saes, accuracy = trained
    assert accuracy > 0.95
    assert all(sae.fvu < 0.1 for sae in saes.values())


@pytest.mark.parametrize("seed", [3, 4])
def test_ig_at_an_upstream_site_adds_up_to_the_real_patching_effect(trained, seed):
    model, saes, _ = trained
    clean, patched = prompts(seed)
    metric = metric_for(clean, patched)
    with torch.no_grad():
        clean_metric = metric(model(clean)).sum()
        patched_output = site_activations(model, patched)["blocks.0"]
        real = float(metric(run_with_output(model, clean, "blocks.0", patched_output)).sum() - clean_metric)
    result = attribute(model, saes, clean, patched, metric, method="ig", steps=64, reduce="sum")
    assert abs(real) > 1.0  # the patch matters
    assert abs(total(result, "blocks.0") - real) <= 0.1 * abs(real), (total(result, "blocks.0"), real)


def test_scores_do_not_depend_on_the_other_hooked_sites(trained):
    model, saes, _ = trained
    clean, patched = prompts(5)
    metric = metric_for(clean, patched)
    for method in ("atp", "ig"):
        alone = attribute(model, {"blocks.0": saes["blocks.0"]}, clean, patched, metric, method=method, steps=4)
        both = attribute(model, saes, clean, patched, metric, method=method, steps=4)
        for part in ("latents", "error"):
            a = getattr(alone.nodes["blocks.0"], part).to_dense()
            b = getattr(both.nodes["blocks.0"], part).to_dense()
            assert (a - b).abs().max() <= 1e-6 * a.abs().max(), (method, part)


def per_latent_effects(model, sae, clean, patched, metric, site="blocks.0"):
    """For each latent active in the clean or patched code at `site`: the real
    change of the metric when only that latent takes its patched value (at
    every position, the error kept at its clean value)."""
    with torch.no_grad():
        x_clean = site_activations(model, clean)[site]
        x_patched = site_activations(model, patched)[site]
        f_clean = dense_code(sae, x_clean)
        f_patched = dense_code(sae, x_patched)
        delta = f_patched - f_clean  # [batch, seq, M]
        base = metric(model(clean)).sum()
        latents = delta.reshape(-1, delta.shape[-1]).abs().amax(0).nonzero().flatten()
        effects = []
        for i in latents.tolist():
            patched_x = x_clean + delta[..., i:i + 1] * sae.W_dec[i]
            effects.append(float(metric(run_with_output(model, clean, site, patched_x)).sum() - base))
    return latents, torch.tensor(effects, dtype=torch.float64)


def dense_code(sae: TopKSAE, x: torch.Tensor) -> torch.Tensor:
    values, indices = sae.encode(x)[:2]
    return torch.zeros(*x.shape[:-1], sae.num_latents, dtype=x.dtype).scatter(-1, indices.long(), values)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


def test_atp_per_latent_tracks_the_real_per_latent_patching(trained):
    model, saes, _ = trained
    clean, patched = prompts(6)
    metric = metric_for(clean, patched)
    latents, real = per_latent_effects(model, saes["blocks.0"], clean, patched, metric)
    assert len(latents) > 20
    scores = {}
    for gradient in ("straight_through", "through_coders"):
        result = attribute(model, saes, clean, patched, metric, reduce="sum", gradient=gradient)
        scores[gradient] = correlation(result.nodes["blocks.0"].latents[latents], real)
    print(f"AtP vs real per-latent patching at blocks.0: correlation {scores}")
    assert scores["straight_through"] > 0.85
