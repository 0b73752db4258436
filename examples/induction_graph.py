"""An attribution graph with ground truth: induction (``… A B … A`` -> ``B``).

1. Train a two-layer GPT-2-style TransformerLens ``HookedTransformer``
   (LayerNorm, learned positions, attention and MLP in each block) on
   sequences of distinct random tokens in which a random segment appears
   twice at a random distance; the loss is read on the second copy only, so
   the one way to lower it is to look up where the current token stood
   before and copy the token that followed it: induction (a previous-token
   head in layer 0, an induction head in layer 1; Olsson et al. 2022).
2. Harvest each MLP's input and output and train one JumpReLU transcoder per
   layer on them with ``interpkernels.train``.
3. ``interpkernels.graphs.attribution_graph`` on a held-out induction prompt,
   ``.prune()``, plot (nodes by layer x position, edge widths by weight) and
   circuit-tracer's frontend JSON.

Ground truth, stated for the graph's own model. The graph is taken in the
local replacement model: attention patterns frozen at their values on the
prompt. Induction's query/key side (the final ``A`` finds the position after
the earlier ``A``) is therefore no edge of it; what the graph must show is
the value/output side: the earlier ``B``'s token embedding is carried by
frozen attention to the last position (by the layer-1 head, from ``B``'s
position or from the positions just after it, to which layer-0 attention
copied it) and read as the ``B`` logit, with no transcoder on the way (the
graph's direct token -> logit edge) or through transcoder features (and
errors) in layer 0 at the positions that hold it and in layer 1 at the last
position. So: ``B`` is the top logit; the earlier ``B``'s
token node is the largest source of the ``B`` logit's influence among the
tokens; a pruned path joins them. Semantics, checked against the real model:
the signed effect the graph gives each token on the ``B`` logit (edges
multiplied along paths, a feature passing on the share of its activation an
edge gave it) predicts what removing that token's embedding does to the
``B`` logit with attention frozen, and at the earlier ``B`` also with
attention live; at the two ``A`` positions the live model differs, because
there the embedding sets the attention pattern (query and key), which the
graph holds fixed.

    python examples/induction_graph.py [--cache DIR] [--seed 0]
        [--plot docs/images/induction_graph.png] [--json docs/data/induction_graph.json]

Everything trained is kept in the cache folder (default
``~/.cache/interpkernels/induction_graph``), keyed by the configuration and
seed, so a rerun goes straight to the graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformer_lens
from tqdm import tqdm

from interpkernels.graphs import attribution_graph, pruning
from interpkernels.nn import JumpReLUTranscoder, SparseCoder
from interpkernels.train import train

BOS = 0


@dataclass(frozen=True)
class Config:
    """The task, the model and the transcoders. The defaults are the example's;
    tests/test_graphs_induction.py runs a smaller one."""

    vocab: int = 64  # token 0 is BOS
    length: int = 24  # tokens after BOS
    d_model: int = 64
    n_heads: int = 4
    model_steps: int = 2000
    model_batch: int = 64
    model_lr: float = 1e-3
    latents: int = 256
    k: int = 8  # at most k latents per token
    transcoder_steps: int = 1500
    transcoder_batch: int = 512
    harvest_sequences: int = 2048

    def key(self, seed: int) -> str:
        text = json.dumps({**dataclasses.asdict(self), "seed": seed}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def derived_seed(name: str, seed: int) -> int:
    """Independent generators for the data, the model's weights and the transcoders'."""
    return int.from_bytes(hashlib.sha256(f"induction_graph.{name}:{seed}".encode()).digest()[:8], "little")


def sample(config: Config, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[n, 1 + length]`` (BOS, then distinct random tokens with one
    segment repeated) and the mask of the positions whose next token the
    induction rule determines (the second copy's, but its last)."""
    length = config.length
    tokens = torch.argsort(torch.rand(n, config.vocab - 1, generator=generator), dim=1)[:, :length] + 1
    mask = torch.zeros(n, 1 + length, dtype=torch.bool)
    for row in range(n):
        segment = int(torch.randint(2, length // 2 + 1, (1,), generator=generator))
        first = int(torch.randint(0, length - 2 * segment + 1, (1,), generator=generator))
        second = first + segment + int(torch.randint(0, length - 2 * segment - first + 1, (1,), generator=generator))
        tokens[row, second:second + segment] = tokens[row, first:first + segment]
        mask[row, 1 + second:1 + second + segment - 1] = True  # BOS shifts positions by one
    return torch.cat([torch.full((n, 1), BOS), tokens], dim=1), mask


def induction_prompt(config: Config, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """``BOS … A B … A``: distinct random tokens, the last a repeat of an
    earlier one at least two back; returns the tokens and the earlier B's
    position. One token shorter than the training sequences: no loss is read
    at their last position, so its position embedding is never trained."""
    length = config.length - 1
    tokens = torch.randperm(config.vocab - 1, generator=generator)[:length] + 1
    a_position = int(torch.randint(0, length - 3, (1,), generator=generator))
    tokens[-1] = tokens[a_position]
    return torch.cat([torch.tensor([BOS]), tokens]), 1 + a_position + 1


def new_model(config: Config, seed: int):
    # Seeded here rather than by the config's seed, which TransformerLens also
    # applies to the global random, numpy and torch generators.
    with torch.random.fork_rng():
        torch.manual_seed(derived_seed("model", seed))
        return transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(
            n_layers=2, d_model=config.d_model, n_ctx=1 + config.length, d_head=config.d_model // config.n_heads,
            n_heads=config.n_heads, d_mlp=4 * config.d_model, d_vocab=config.vocab, act_fn="gelu_new",
            normalization_type="LN", positional_embedding_type="standard", device="cpu"))


def induction_loss(model, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and accuracy on the masked positions' next tokens."""
    logits = model(tokens)[:, :-1]
    targets, where = tokens[:, 1:], mask[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits[where], targets[where])
    return loss, (logits[where].argmax(-1) == targets[where]).float().mean()


def train_model(config: Config, seed: int, progress: bool = True):
    model = new_model(config, seed)
    data = torch.Generator().manual_seed(derived_seed("data", seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.model_lr, weight_decay=0.01)
    bar = tqdm(range(config.model_steps), desc="model", unit="step", disable=not progress, file=sys.stderr)
    for step in bar:
        loss, accuracy = induction_loss(model, *sample(config, config.model_batch, data))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", accuracy=f"{accuracy.item():.2f}")
    return model.eval()


MLP_INPUT, MLP_OUTPUT = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"
MLP_SITES = [site.format(layer=layer) for site in (MLP_INPUT, MLP_OUTPUT) for layer in range(2)]


def harvest(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (MLP input, MLP output) rows of every position but BOS (whose
    features and errors the graph zeroes)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=MLP_SITES)
    return [(cache[MLP_INPUT.format(layer=layer)][:, 1:].reshape(-1, model.cfg.d_model),
             cache[MLP_OUTPUT.format(layer=layer)][:, 1:].reshape(-1, model.cfg.d_model)) for layer in range(2)]


def train_transcoder(config: Config, rows: tuple[torch.Tensor, torch.Tensor], layer: int, seed: int,
                     progress: bool = True) -> JumpReLUTranscoder:
    """A JumpReLU transcoder (threshold held at 0: a ReLU code of at most k
    latents) fitted to one MLP with interpkernels.train."""
    inputs, outputs = rows
    transcoder = JumpReLUTranscoder(config.d_model, config.latents, config.k, initial_threshold=0.0,
                                    seed=derived_seed(f"transcoder{layer}", seed))
    transcoder.threshold.requires_grad_(False)
    order = torch.Generator().manual_seed(derived_seed(f"batches{layer}", seed))

    def batches():
        while True:
            pick = torch.randint(0, inputs.shape[0], (config.transcoder_batch,), generator=order)
            yield inputs[pick], outputs[pick]

    train(transcoder, batches(), steps=config.transcoder_steps, lr=3e-3, progress=progress,
          dead_after_tokens=100_000)
    return transcoder.eval()


def trained(config: Config, seed: int, cache: Path | None, log=print, progress: bool = True):
    """The model and its transcoders, read from `cache` when it holds them (a
    folder per configuration and seed), else trained and written there."""
    from safetensors.torch import load_file, save_file

    folder = cache / config.key(seed) if cache is not None else None
    timings = {}
    if folder is not None and (folder / "model.safetensors").exists():
        started = time.perf_counter()
        model = new_model(config, seed)
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
        transcoders = [SparseCoder.load(folder / f"transcoder_{layer}.safetensors").eval() for layer in range(2)]
        log(f"read the model and transcoders from {folder}")
        timings["read cache"] = time.perf_counter() - started
        return model.eval(), transcoders, timings
    started = time.perf_counter()
    model = train_model(config, seed, progress)
    timings["train model"] = time.perf_counter() - started
    started = time.perf_counter()
    tokens, _ = sample(config, config.harvest_sequences, torch.Generator().manual_seed(derived_seed("harvest", seed)))
    transcoders = [train_transcoder(config, rows, layer, seed, progress)
                   for layer, rows in enumerate(harvest(model, tokens))]
    timings["train transcoders"] = time.perf_counter() - started
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        for layer, transcoder in enumerate(transcoders):
            transcoder.save(folder / f"transcoder_{layer}.safetensors")
        save_file({name: p.detach().contiguous() for name, p in model.state_dict().items()},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**dataclasses.asdict(config), "seed": seed}, indent=2))
        log(f"wrote the model and transcoders to {folder}")
    return model, transcoders, timings


class TokenNames:
    """The tokenizer save_json asks for: decodes an id (or a list) to its name."""

    def decode(self, ids) -> str:
        if isinstance(ids, int):
            return "<bos>" if ids == BOS else f"t{ids}"
        return " ".join(self.decode(int(i)) for i in ids)


def induction_accuracy(config: Config, model, n: int, seed: int) -> tuple[float, float]:
    """Top-1 accuracy of B at the last position of n held-out ``… A B … A``
    prompts, and the chance of guessing uniformly among the earlier tokens."""
    generator = torch.Generator().manual_seed(derived_seed("held_out", seed))
    prompts = [induction_prompt(config, generator) for _ in range(n)]
    tokens = torch.stack([p for p, _ in prompts])
    answers = torch.stack([p[b] for p, b in prompts])
    with torch.no_grad():
        predicted = model(tokens)[:, -1].argmax(-1)
    return float((predicted == answers).float().mean()), 1 / (config.length - 1)


def signed_effects(graph, logit_index: int) -> torch.Tensor:
    """Each node's signed effect on one (de-meaned) logit in the replacement
    model: its edges multiplied along every path, a feature passing on
    ``edge / activation`` of what reaches it (its activation is its
    pre-activation while it stays active, so this is the linear effect of
    removing the source). Sparse, n_layers + 1 rounds (features only read
    earlier layers)."""
    rows, columns, values = graph.edges()
    n_features = graph.n_features
    sensitivity = values.new_zeros(graph.adjacency.shape[0])
    effects = values.new_zeros(graph.adjacency.shape[0])
    for _ in range(graph.n_layers + 1):
        sensitivity.zero_()
        sensitivity[graph.logit_node(logit_index)] = 1.0
        sensitivity[:n_features] = effects[:n_features] / graph.activation_values
        effects = values.new_zeros(graph.adjacency.shape[0]).index_add_(0, columns, sensitivity[rows] * values)
    return effects


def effect_routes(graph, logit_index: int, source: int) -> dict[str, float]:
    """A source's signed effect on a logit (:func:`signed_effects`) split by
    its first edge: straight into the logit, or into the features of layer l
    (and on from there)."""
    effects = signed_effects(graph, logit_index)
    rows, columns, values = graph.edges()
    first = columns == source
    targets, values = rows[first], values[first]
    routes = {"direct": float(values[targets == graph.logit_node(logit_index)].sum())}
    into_features = targets < graph.n_features
    for layer in range(graph.n_layers):
        hop = into_features.clone()
        hop[into_features] = graph.active_features[targets[into_features], 0] == layer
        through = targets[hop]
        routes[f"layer {layer} features"] = float(
            (values[hop] * effects[through] / graph.activation_values[through]).sum())
    return routes


def embedding_removal_effects(model, tokens: torch.Tensor, answer: int, freeze_attention: bool,
                              transcoders=None) -> torch.Tensor:
    """For each position, the change of the de-meaned ``answer`` logit at the
    last position when that position's token embedding is set to zero: in the
    real model (MLPs included) with attention patterns and LayerNorm scales
    held at their values on the prompt, or live; given `transcoders`, in the
    local replacement model the graph describes (patterns and scales held, each
    MLP's output its transcoder's reconstruction plus the error it leaves on
    the prompt, held)."""
    frozen_names = [name for name in model.hook_dict if name.endswith(("attn.hook_pattern", "hook_scale"))]
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(tokens[None], names_filter=frozen_names + MLP_SITES)

        def de_meaned(logits):
            return logits[:, -1, answer] - logits[:, -1].mean(-1)

        n_pos = tokens.shape[0]
        batch = tokens[None].repeat(n_pos, 1)

        def remove_embedding(acts, hook):
            acts = acts.clone()
            acts[torch.arange(n_pos), torch.arange(n_pos)] = 0
            return acts

        def reconstruct(layer, x):
            return transcoders[layer].reconstruct(x, *transcoders[layer].encode(x))

        mlp_inputs = {}

        def record_input(acts, hook, layer):
            mlp_inputs[layer] = acts

        def replace_output(acts, hook, layer):
            clean_input = cache[MLP_INPUT.format(layer=layer)]
            error = cache[MLP_OUTPUT.format(layer=layer)] - reconstruct(layer, clean_input)
            return reconstruct(layer, mlp_inputs[layer]) + error

        hooks = [("hook_embed", remove_embedding)]
        if freeze_attention or transcoders is not None:
            hooks += [(name, lambda acts, hook: cache[hook.name].expand_as(acts)) for name in frozen_names]
        if transcoders is not None:
            for layer in range(2):
                hooks += [(MLP_INPUT.format(layer=layer),
                           lambda acts, hook, layer=layer: record_input(acts, hook, layer)),
                          (MLP_OUTPUT.format(layer=layer),
                           lambda acts, hook, layer=layer: replace_output(acts, hook, layer))]
        patched = model.run_with_hooks(batch, fwd_hooks=hooks)
        return de_meaned(patched) - de_meaned(clean_logits)


def pruned_path(pruned, source: int, target: int) -> list[int] | None:
    """A path of kept edges from `source` to `target` (breadth-first, fewest
    edges), or None."""
    rows, columns = pruned.edges.indices().tolist()
    successors: dict[int, list[int]] = {}
    for row, column in zip(rows, columns):
        successors.setdefault(column, []).append(row)
    previous, frontier = {source: None}, [source]
    while frontier:
        next_frontier = []
        for node in frontier:
            for successor in successors.get(node, []):
                if successor not in previous:
                    previous[successor] = node
                    next_frontier.append(successor)
        frontier = next_frontier
    if target not in previous:
        return None
    path = [target]
    while previous[path[-1]] is not None:
        path.append(previous[path[-1]])
    return path[::-1]


@dataclass
class Outcome:
    config: Config
    seed: int
    accuracy: float  # held-out induction prompts, top-1 B
    chance: float
    fvu: list[float]  # per layer, on held-out rows
    tokens: torch.Tensor
    b_position: int
    a_positions: tuple[int, int]
    answer: int  # B
    top_logit: int
    answer_probability: float
    graph: object
    pruned: object
    scores: tuple[float, float]
    influence_share: float  # earlier B's share of the tokens' influence on the B logit
    influence_rank: int  # rank of the earlier B's token node among all nodes (0: first)
    token_influence_rank: int  # ... among the token nodes
    graph_effects: torch.Tensor  # [n_pos] signed effect of each token node on the B logit (graph)
    replacement_effects: torch.Tensor  # [n_pos] removing each embedding in the local replacement model
    frozen_effects: torch.Tensor  # [n_pos] removing each embedding, attention frozen (real model)
    live_effects: torch.Tensor  # [n_pos] the same, attention live
    replaced_by: int  # the token put in B's place
    replaced_top: int  # the live model's top token then
    replaced_answer_change: float  # change of the de-meaned B logit then
    path: list[int] | None  # kept edges from the earlier B to the B logit
    routes: dict[str, float]  # the earlier B's signed effect on the B logit by its first edge (effect_routes)
    skipped_prompts: int  # prompts drawn before one the model answers with B
    timings: dict

    def node_name(self, node: int) -> str:
        graph = self.graph
        n_pos = graph.tokens.shape[0]
        if node < graph.n_features:
            layer, position, latent = graph.active_features[node].tolist()
            return f"feature L{layer} pos {position} #{latent}"
        if node < graph.n_features + graph.n_layers * n_pos:
            layer, position = divmod(node - graph.n_features, n_pos)
            return f"error L{layer} pos {position}"
        if node < graph.logit_node(0):
            position = node - graph.token_node(0)
            return f"token pos {position} ({TokenNames().decode(int(graph.tokens[position]))})"
        return f"logit {TokenNames().decode(int(graph.logit_tokens[node - graph.logit_node(0)]))}"


def analyse(config: Config, model, transcoders, seed: int, timings: dict, log=print) -> Outcome:
    started = time.perf_counter()
    accuracy, chance = induction_accuracy(config, model, 512, seed)
    log(f"held-out induction prompts: B top-1 in {accuracy:.1%} (chance among earlier tokens {chance:.1%})")
    held_out, _ = sample(config, 256, torch.Generator().manual_seed(derived_seed("fvu", seed)))
    fvu = []
    with torch.no_grad():
        for transcoder, (inputs, outputs) in zip(transcoders, harvest(model, held_out)):
            fvu.append(float(transcoder(inputs, outputs).fvu))
    log(f"transcoders' FVU on held-out rows: {', '.join(f'{f:.3f}' for f in fvu)}")

    # The graph of a prompt the model gets right: the first drawn that it answers with B.
    prompts = torch.Generator().manual_seed(derived_seed("prompt", seed))
    for skipped in range(100):
        tokens, b_position = induction_prompt(config, prompts)
        answer = int(tokens[b_position])
        with torch.no_grad():
            if int(model(tokens[None])[0, -1].argmax()) == answer:
                break
    else:
        raise RuntimeError("the model answers none of 100 induction prompts: it has not learned induction")
    timings["checks"] = time.perf_counter() - started
    started = time.perf_counter()
    graph = attribution_graph(model, transcoders, tokens, max_n_logits=5, desired_logit_prob=0.95, batch_size=64)
    timings["attribution_graph"] = time.perf_counter() - started
    started = time.perf_counter()
    pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    timings["prune"] = time.perf_counter() - started
    scores = graph.scores()
    started = time.perf_counter()

    logit_tokens = graph.logit_tokens.tolist()
    top_logit = logit_tokens[0]
    b_logit = logit_tokens.index(answer) if answer in logit_tokens else None
    if b_logit is None:
        raise RuntimeError(f"the model does not rank B ({answer}) among its top logits {logit_tokens}: "
                           "it has not learned induction")
    one_hot = pruning.logit_weights(graph).zero_()
    one_hot[graph.logit_node(b_logit)] = 1.0
    influence = pruning.influence(graph.adjacency, one_hot)
    token_nodes = torch.arange(graph.token_node(0), graph.token_node(0) + tokens.shape[0])
    b_node = graph.token_node(b_position)
    influence_share = float(influence[b_node] / influence[token_nodes].sum())
    influence_rank = int((influence[:graph.logit_node(0)] > influence[b_node]).sum())
    token_influence_rank = int((influence[token_nodes] > influence[b_node]).sum())
    graph_effects = signed_effects(graph, b_logit)[token_nodes]
    replacement_effects = embedding_removal_effects(model, tokens, answer, freeze_attention=True,
                                                    transcoders=transcoders)
    frozen_effects = embedding_removal_effects(model, tokens, answer, freeze_attention=True)
    live_effects = embedding_removal_effects(model, tokens, answer, freeze_attention=False)

    replacement = next(t for t in range(1, config.vocab) if t not in tokens.tolist())
    replaced = tokens.clone()
    replaced[b_position] = replacement
    with torch.no_grad():
        clean, patched = model(torch.stack([tokens, replaced]))[:, -1]
    replaced_answer_change = float((patched[answer] - patched.mean()) - (clean[answer] - clean.mean()))
    path = pruned_path(pruned, b_node, graph.logit_node(b_logit))
    routes = effect_routes(graph, b_logit, b_node)
    timings["checks"] += time.perf_counter() - started
    a_positions = (b_position - 1, tokens.shape[0] - 1)
    return Outcome(config, seed, accuracy, chance, fvu, tokens, b_position, a_positions, answer, top_logit,
                   float(graph.logit_probabilities[b_logit]), graph, pruned, scores, influence_share, influence_rank,
                   token_influence_rank, graph_effects, replacement_effects, frozen_effects, live_effects, replacement,
                   int(patched.argmax()), replaced_answer_change, path, routes, skipped, timings)


def summary(outcome: Outcome) -> list[str]:
    names = TokenNames()
    graph, pruned = outcome.graph, outcome.pruned
    kept = int(pruned.node_mask.sum())
    lines = [
        f"prompt: {names.decode(outcome.tokens.tolist())}",
        f"  A = {names.decode(int(outcome.tokens[-1]))} at positions {outcome.a_positions}, "
        f"B = {names.decode(outcome.answer)} at position {outcome.b_position}",
        f"top logit {names.decode(outcome.top_logit)} (B: p = {outcome.answer_probability:.3f}; "
        f"{outcome.skipped_prompts} prompts drawn before it the model got wrong)",
        f"graph: {graph.n_features} features, {graph.adjacency._nnz()} edges; pruned (0.8, 0.98): {kept} nodes, "
        f"{pruned.edges._nnz()} edges; replacement {outcome.scores[0]:.3f}, completeness {outcome.scores[1]:.3f}",
        f"influence on the B logit: the earlier B's token node holds {outcome.influence_share:.1%} of the tokens' "
        f"(rank {outcome.token_influence_rank + 1} of {graph.tokens.shape[0]} tokens, "
        f"{outcome.influence_rank + 1} among all nodes)",
        "the earlier B's signed effect on the B logit by its first edge: " + ", ".join(
            f"{route} {effect:.3f}" for route, effect in outcome.routes.items()),
        "kept path: " + (" -> ".join(outcome.node_name(node) for node in outcome.path) if outcome.path else "none"),
        "change of the de-meaned B logit when each token's embedding is removed: the graph's (minus the "
        "token's signed effect) | the local replacement model's | the real model's, attention frozen | live:",
    ]
    for position in range(1, graph.tokens.shape[0]):
        role = {outcome.b_position: "  <- earlier B", outcome.a_positions[0]: "  <- earlier A",
                outcome.a_positions[1]: "  <- final A"}.get(position, "")
        lines.append(f"  pos {position:2d} {names.decode(int(outcome.tokens[position])):>4}: "
                     f"{-outcome.graph_effects[position]:8.3f} | {outcome.replacement_effects[position]:8.3f} | "
                     f"{outcome.frozen_effects[position]:8.3f} | "
                     f"{outcome.live_effects[position]:8.3f}{role}")
    lines.append(f"B replaced by {names.decode(outcome.replaced_by)}: the live model's top token becomes "
                 f"{names.decode(outcome.replaced_top)}, the de-meaned B logit changes by "
                 f"{outcome.replaced_answer_change:.3f}")
    return lines


def plot(outcome: Outcome, path: str) -> None:
    """The pruned graph: tokens at the bottom, each layer's features (circles)
    and errors (squares) above their position, logits on top; edge widths by
    |weight| (blue positive, red negative)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    graph, pruned = outcome.graph, outcome.pruned
    names = TokenNames()
    n_pos, n_features = graph.tokens.shape[0], graph.n_features
    kept = pruned.node_mask.nonzero().flatten().tolist()
    groups: dict[tuple[int, int], list[int]] = {}  # (row, position) -> nodes
    for node in kept:
        if node < n_features:
            layer, position, _ = graph.active_features[node].tolist()
            groups.setdefault((1 + layer, position), []).append(node)
        elif node < graph.token_node(0):
            layer, position = divmod(node - n_features, n_pos)
            groups.setdefault((1 + layer, position), []).append(node)
        elif node < graph.logit_node(0):
            groups.setdefault((0, node - graph.token_node(0)), []).append(node)
        else:
            groups.setdefault((1 + graph.n_layers, n_pos - 1), []).append(node)
    where = {}
    for (row, position), nodes in groups.items():
        for rank, node in enumerate(nodes):
            if row == 1 + graph.n_layers:  # the logits, leftwards from the last position, most probable first
                where[node] = (position - 1.5 * rank, row)
                continue
            offset = 0.0 if len(nodes) == 1 else 0.6 * (rank / (len(nodes) - 1) - 0.5)
            where[node] = (position + offset, row)

    fig, ax = plt.subplots(figsize=(12, 5.2))
    targets, sources = pruned.edges.indices().tolist()
    weights = pruned.edges.values()
    largest = float(weights.abs().max())
    for target, source, weight in sorted(zip(targets, sources, weights.tolist()), key=lambda e: abs(e[2])):
        if source in where and target in where:
            (x0, y0), (x1, y1) = where[source], where[target]
            ax.plot([x0, x1], [y0, y1], color="tab:blue" if weight > 0 else "tab:red",
                    linewidth=0.2 + 5 * abs(weight) / largest, alpha=0.25 + 0.6 * abs(weight) / largest, zorder=1)
    b_logit_node = graph.logit_node(graph.logit_tokens.tolist().index(outcome.answer))
    for node, (x, y) in where.items():
        if node < n_features:
            marker, colour = "o", "tab:purple"
        elif node < graph.token_node(0):
            marker, colour = "s", "tab:gray"
        elif node < graph.logit_node(0):
            position = node - graph.token_node(0)
            marker = "^"
            colour = ("tab:orange" if position == outcome.b_position
                      else "tab:green" if position in outcome.a_positions else "lightgray")
        else:
            marker, colour = "D", "tab:orange" if node == b_logit_node else "lightgray"
        ax.scatter([x], [y], marker=marker, s=70, color=colour, edgecolor="black", linewidth=0.5, zorder=2)
        if node >= graph.logit_node(0):
            rank = node - graph.logit_node(0)
            ax.annotate(f"{names.decode(int(graph.logit_tokens[rank]))}\np={graph.logit_probabilities[rank]:.2f}",
                        (x, y), textcoords="offset points", xytext=(0, 9), ha="center", fontsize=7)
    roles = {outcome.b_position: "\n(B)", outcome.a_positions[0]: "\n(A)", outcome.a_positions[1]: "\n(A)"}
    ax.set_xticks(range(n_pos), [names.decode(int(t)) + roles.get(p, "") for p, t in enumerate(graph.tokens.tolist())],
                  fontsize=7)
    ax.set_yticks(range(graph.n_layers + 2), ["tokens"] + [f"layer {layer}" for layer in range(graph.n_layers)]
                  + ["logits"])
    ax.set_ylim(-0.5, graph.n_layers + 1.8)
    ax.set_xlim(-0.7, n_pos - 0.3)
    ax.set_title(f"Pruned attribution graph (0.8, 0.98) of an induction prompt: {int(pruned.node_mask.sum())} nodes, "
                 f"{pruned.edges._nnz()} edges; the earlier B holds {outcome.influence_share:.0%} of the tokens' "
                 f"influence on the B logit", fontsize=9)
    ax.text(0.01, 0.98, "circles: transcoder features, squares: errors; blue/red: positive/negative edges, "
            "width by |weight|", transform=ax.transAxes, fontsize=7, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(config: Config = Config(), seed: int = 0, cache: Path | None = None, log=print,
        progress: bool = True) -> Outcome:
    model, transcoders, timings = trained(config, seed, cache, log, progress)
    return analyse(config, model, transcoders, seed, timings, log)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "interpkernels" / "induction_graph"),
                        help="folder for the trained model and transcoders ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="write the pruned graph's plot here (needs matplotlib)")
    parser.add_argument("--json", help="write circuit-tracer's frontend JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model; the machine may be shared
    started = time.perf_counter()
    outcome = run(Config(), args.seed, Path(args.cache) if args.cache else None)
    print("\n".join(summary(outcome)))
    if args.plot:
        begun = time.perf_counter()
        plot(outcome, args.plot)
        outcome.timings["plot"] = time.perf_counter() - begun
    if args.json:
        outcome.graph.save_json(args.json, TokenNames(), scan="induction-transcoders")
    outcome.timings["total"] = time.perf_counter() - started
    print("timings: " + ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in outcome.timings.items()))
    recovered = (outcome.top_logit == outcome.answer and outcome.token_influence_rank == 0
                 and outcome.path is not None)
    return 0 if recovered else 1


if __name__ == "__main__":
    sys.exit(main())
