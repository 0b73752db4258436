"""interpkernels.graphs.attribution_graph against two oracles from the source:

- circuit-tracer 0.5.0's own attribute() on the same weights and prompt, run in
  its environment (tests/circuit_tracer_side.py), node for node and edge for edge;
- a frozen intervention on the model, as circuit-tracer's tests verify edges
  (tests/test_attribution.py's verify_feature_edges there: attention patterns,
  LayerNorm scales and every MLP output held at their values on the prompt,
  remove one source, read every target's change).

Transcoder kinds: per-layer JumpReLU without ("plain") and with a skip
connection ("skip"), per-layer top-k ("topk": circuit-tracer 0.5.0's
SingleLayerTranscoders running its TopK activation; it has no file form of
them, tests/test_graphs_transcoders.py), a JumpReLU cross-layer transcoder ("clt"), and interpkernels'
top-k cross-layer transcoder ("clt-topk": circuit-tracer 0.5.0's
cross-layer transcoders are ReLU or JumpReLU only, so only the intervention
checks it).
"""

import itertools
import json

import pytest
import torch
from circuit_tracer_env import run_circuit_tracer
from safetensors.torch import load_file, save_file
from test_graphs_transcoders import save_top_k_folder

from interpkernels.graphs import (HookedCrossLayerTranscoder, TranscoderSet, attribution, attribution_graph,
                                  load_transcoders, pruning, save_transcoders)
from interpkernels.nn import CrossLayerTranscoder, JumpReLUCrossLayerTranscoder, JumpReLUTranscoder, Transcoder

transformer_lens = pytest.importorskip("transformer_lens")

CONFIG = dict(n_layers=3, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=32, d_vocab=24)
ARCHITECTURES = {
    "gpt2": dict(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"),
    "llama": dict(act_fn="silu", normalization_type="RMS", final_rms=True, positional_embedding_type="rotary",
                  rotary_dim=4, gated_mlp=True),
}
DTYPES = [torch.float64, torch.float32]
LATENTS = 40
TOP_K = 8
KINDS = ["plain", "skip", "topk", "clt", "clt-topk"]
CIRCUIT_TRACER_KINDS = ["plain", "skip", "topk", "clt"]
PARTIAL_KINDS = ["plain", "clt"]  # max_feature_nodes on per-layer and cross-layer transcoders
TOKENS = torch.tensor([0, 5, 9, 3, 17, 5, 2])  # 0 is BOS
OPTIONS = dict(max_n_logits=5, desired_logit_prob=0.8, batch_size=16)
# circuit-tracer's defaults, and an edge threshold at which dropping nodes left
# without incoming or outgoing edges removes some (checked: 67 -> 50 nodes).
PRUNINGS = [dict(node_threshold=0.8, edge_threshold=0.98), dict(node_threshold=0.8, edge_threshold=0.7)]
# max_feature_nodes: rows for 60 of the ~320 features, chosen over 4 re-rankings
# (circuit-tracer re-ranks every update_interval * batch_size = 16 rows).
PARTIAL = dict(OPTIONS, batch_size=8, update_interval=2, max_feature_nodes=60)


def randomize_(module, dtype: torch.dtype):
    """Every parameter N(0, 0.25); JumpReLU thresholds U(0, 1); top-k encoder
    biases shifted up by 2 (ranks unchanged) so that every token's k largest
    pre-activations are positive, where circuit-tracer's top-k (which keeps
    negative ones) and interpkernels' (of relu(pre)) agree."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            parameter.copy_(torch.randn(parameter.shape) * 0.5)
        for name, parameter in module.named_parameters():
            if name.startswith("threshold"):
                parameter.uniform_(0.0, 1.0)
            elif name.startswith("b_enc") and not hasattr(module, "threshold"):
                parameter += 2.0
    return module.to(dtype)


def random_case(dtype: torch.dtype, architecture: str = "gpt2", kind: str = "plain", seed: int = 0):
    """A HookedTransformer (GPT-2 style: LayerNorm, learned positions; Llama
    style: RMSNorm, rotary, gated MLP) with random weights and random
    transcoders of `kind` (module docstring); JumpReLU ones have about a third
    of their latents active."""
    torch.manual_seed(seed)
    model = transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(
        **CONFIG, **ARCHITECTURES[architecture], seed=seed, dtype=dtype, device="cpu"))
    n_layers, d = CONFIG["n_layers"], CONFIG["d_model"]
    # Seeded constructors draw their initial weights from their own generator, not torch's.
    if kind == "clt":
        clt = JumpReLUCrossLayerTranscoder(n_layers, d, LATENTS, LATENTS, seed=0)
        return model, HookedCrossLayerTranscoder(randomize_(clt, dtype))
    if kind == "clt-topk":
        return model, randomize_(CrossLayerTranscoder(n_layers, d, LATENTS, TOP_K, seed=0), dtype)
    layers = [JumpReLUTranscoder(d, LATENTS, LATENTS, skip=kind == "skip", seed=layer) if kind != "topk"
              else Transcoder(d, LATENTS, TOP_K, seed=layer) for layer in range(n_layers)]
    return model, TranscoderSet([randomize_(transcoder, dtype) for transcoder in layers])


def cross_layer(transcoders) -> CrossLayerTranscoder | None:
    if isinstance(transcoders, HookedCrossLayerTranscoder):
        return transcoders.transcoder
    return transcoders if isinstance(transcoders, CrossLayerTranscoder) else None


def feature_writes(transcoders, layer: int, position: int, latent: int, value) -> list:
    """(MLP output hook, position, vector) for each MLP output a feature writes to:
    its own layer's, and for a cross-layer transcoder every later one's too."""
    if (clt := cross_layer(transcoders)) is not None:
        return [(f"blocks.{output}.hook_mlp_out", position, value * clt.W_dec[layer][latent, output - layer])
                for output in range(layer, CONFIG["n_layers"])]
    return [(f"blocks.{layer}.hook_mlp_out", position, value * transcoders[layer].W_dec[latent])]


def encoder_row(transcoders, layer: int, latent: int) -> torch.Tensor:
    clt = cross_layer(transcoders)
    return clt.W_enc[layer][latent] if clt is not None else transcoders[layer].W_enc[latent]


def reconstructions(transcoders, inputs: list) -> list:
    """Each layer's MLP output as the transcoders rebuild it from the MLP inputs."""
    if (clt := cross_layer(transcoders)) is not None:
        return clt.decode([clt.encode_layer(layer, x) for layer, x in enumerate(inputs)])
    return [transcoder.reconstruct(x, *transcoder.encode(x)) for transcoder, x in zip(transcoders, inputs)]


def skip_weight(transcoders, layer: int):
    return None if cross_layer(transcoders) is not None else transcoders[layer].W_skip


def frozen_intervention_adjacency(model, transcoders, graph) -> torch.Tensor:
    """The dense adjacency measured by intervention: for each source (feature,
    error, token), a forward pass with attention patterns, LayerNorm scales and
    MLP outputs frozen at their values on the prompt and that source's vector
    removed (a cross-layer feature's from every MLP output it writes to); edge =
    minus the change of each target's pre-activation
    (encoder row . MLP input) or de-meaned logit. A skip connection stays live:
    its MLP output moves by ``W_skip`` times its input's change (circuit-tracer's
    setup_intervention_with_freeze). One batch member per source."""
    n_layers, n_pos = CONFIG["n_layers"], TOKENS.shape[0]
    frozen_names = [name for name in model.hook_dict if name.endswith(("hook_pattern", "hook_scale", "hook_mlp_out"))]
    read_names = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(n_layers)] + ["ln_final.hook_normalized"]
    with torch.no_grad():
        _, cache = model.run_with_cache(TOKENS[None], names_filter=frozen_names + read_names + ["hook_embed"])
        # Sources in node order, each a list of (hook, position, vector removed there).
        sources = [feature_writes(transcoders, layer, position, latent, value)
                   for (layer, position, latent), value in zip(graph.active_features.tolist(), graph.activation_values)]
        rebuilt = reconstructions(transcoders, [cache[f"blocks.{layer}.ln2.hook_normalized"][0]
                                                for layer in range(n_layers)])
        for layer in range(n_layers):
            error = cache[f"blocks.{layer}.hook_mlp_out"][0] - rebuilt[layer]
            sources += [[(f"blocks.{layer}.hook_mlp_out", position, error[position] * (position > 0))]
                        for position in range(n_pos)]
        sources += [[("hook_embed", position, cache["hook_embed"][0, position])] for position in range(n_pos)]

        mlp_inputs = {}

        def record_mlp_input(acts, hook):
            mlp_inputs[hook.layer()] = acts

        def removed(acts, hook):
            value = cache[hook.name].expand(len(sources), *cache[hook.name].shape[1:]).clone()
            for member, writes in enumerate(sources):
                for name, position, vector in writes:
                    if name == hook.name:
                        value[member, position] -= vector
            if hook.name.endswith("hook_mlp_out") and (W_skip := skip_weight(transcoders, hook.layer())) is not None:
                moved = mlp_inputs[hook.layer()] - cache[f"blocks.{hook.layer()}.ln2.hook_normalized"]
                value += moved @ W_skip.T
            return value

        hooks = [(name, removed) for name in frozen_names + ["hook_embed"]]
        hooks += [(name, record_mlp_input) for name in read_names[:-1]]
        with model.hooks(fwd_hooks=hooks):
            _, runs = model.run_with_cache(TOKENS[None].expand(len(sources), -1), names_filter=read_names)

        def targets(run, member) -> torch.Tensor:
            values = [encoder_row(transcoders, layer, latent)
                      @ run[f"blocks.{layer}.ln2.hook_normalized"][member, position]
                      for layer, position, latent in graph.active_features.tolist()]
            W_U = model.W_U
            demeaned = (W_U[:, graph.logit_tokens] - W_U.mean(dim=-1, keepdim=True)).T
            return torch.cat([torch.stack(values), demeaned @ run["ln_final.hook_normalized"][member, -1]])

        baseline = targets(cache, 0)
        n_nodes = graph.adjacency.shape[0]
        target_rows = torch.cat([torch.arange(graph.n_features),
                                 torch.arange(n_nodes - graph.logit_tokens.shape[0], n_nodes)])
        adjacency = torch.zeros(n_nodes, n_nodes, dtype=baseline.dtype)
        for member in range(len(sources)):  # source columns: features, errors, tokens, in node order
            adjacency[target_rows, member] = baseline - targets(runs, member)
    return adjacency


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_edge_is_a_frozen_intervention(dtype, architecture, kind):
    model, transcoders = random_case(dtype, architecture, kind)
    graph = attribution_graph(model, transcoders, TOKENS, **OPTIONS)
    assert graph.n_features > 20 and graph.adjacency._nnz() > 500, "too few nodes or edges to check anything"
    want = frozen_intervention_adjacency(model, transcoders, graph)
    got = graph.adjacency.to_dense()
    scale = want.abs().max()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    assert (got - want).abs().max() <= tolerance * scale
    # Every feature's row was computed; features and errors at BOS are not nodes.
    assert torch.equal(graph.selected_features, torch.arange(graph.n_features))
    assert bool((graph.active_features[:, 1] > 0).all())


def write_case(folder, architecture: str, dtype: torch.dtype, kind: str, **side_options) -> None:
    """The folder circuit_tracer_side.py's graph command reads: random_case(seed=1)'s
    model and transcoders, the prompt, and its config (plus `side_options`)."""
    model, transcoders = random_case(dtype, architecture, kind, seed=1)
    (save_top_k_folder if kind == "topk" else save_transcoders)(transcoders, folder / "transcoders")
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, folder / "model.safetensors")
    save_file({"tokens": TOKENS}, folder / "tokens.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {**CONFIG, **ARCHITECTURES[architecture], "seed": 1, "dtype": str(dtype).removeprefix("torch."),
         "attribute": OPTIONS, "prune": PRUNINGS} | side_options))


@pytest.fixture(scope="module")
def circuit_tracer_graphs(tmp_path_factory) -> dict:
    """circuit-tracer's attribute() on every case (architecture, dtype, kind),
    in one run of its environment (which takes ~15 s to start): the folder of each."""
    folders = {}
    for architecture, dtype, kind in itertools.product(ARCHITECTURES, DTYPES, CIRCUIT_TRACER_KINDS):
        folder = folders[architecture, dtype, kind] = tmp_path_factory.mktemp(f"{architecture}-{dtype}-{kind}")
        write_case(folder, architecture, dtype, kind)
    for architecture, dtype, kind in itertools.product(ARCHITECTURES, DTYPES, PARTIAL_KINDS):
        folder = folders["partial", architecture, dtype, kind] = tmp_path_factory.mktemp(
            f"partial-{architecture}-{dtype}-{kind}")
        write_case(folder, architecture, dtype, kind, attribute=PARTIAL)
    run_circuit_tracer("graph", *folders.values())
    return folders


def assert_equals_theirs(ours, theirs: dict, dtype) -> None:
    """Every node, edge, score and pruning of `ours` equal to circuit-tracer's
    (circuit_tracer_side.py's theirs.safetensors)."""
    assert torch.equal(ours.active_features, theirs["active_features"])
    assert torch.equal(ours.selected_features, theirs["selected_features"])
    assert torch.equal(ours.logit_tokens, theirs["logit_tokens"])
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.activation_values, theirs["activation_values"], **tolerance)
    torch.testing.assert_close(ours.logit_probabilities, theirs["logit_probabilities"], **tolerance)
    want = theirs["adjacency"]
    got = ours.adjacency.to_dense()
    assert got.shape == want.shape
    scale = want.abs().max()
    assert (got - want).abs().max() <= (1e-12 if dtype == torch.float64 else 1e-4) * scale
    # The same edges exist: none of theirs is missing here beyond rounding.
    assert ((want != 0) & (got == 0)).sum() == 0

    torch.testing.assert_close(torch.tensor(ours.scores(), dtype=torch.float64), theirs["scores"], **tolerance)
    for index, options in enumerate(PRUNINGS):
        pruned = ours.prune(**options)
        assert torch.equal(pruned.node_mask, theirs[f"node_mask{index}"])
        # Their mask covers every entry of their dense matrix; the kept non-zero edges are the comparable part.
        assert torch.equal(pruned.edges.to_dense() != 0, theirs[f"edge_mask{index}"] & (want != 0))
        assert 0 < pruned.edges._nnz() < ours.adjacency._nnz() and not bool(pruned.node_mask.all())
        torch.testing.assert_close(pruned.cumulative_scores, theirs[f"cumulative_scores{index}"], **tolerance)


@pytest.mark.parametrize("kind", CIRCUIT_TRACER_KINDS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_graph_equals_circuit_tracers_attribute(dtype, architecture, kind, circuit_tracer_graphs):
    folder = circuit_tracer_graphs[architecture, dtype, kind]
    model, _ = random_case(dtype, architecture, kind, seed=1)
    ours = attribution_graph(model, load_transcoders(folder / "transcoders"), TOKENS, **OPTIONS)
    assert_equals_theirs(ours, load_file(folder / "theirs.safetensors"), dtype)


@pytest.mark.parametrize("kind", PARTIAL_KINDS)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_max_feature_nodes_selects_circuit_tracers_rows(dtype, architecture, kind, circuit_tracer_graphs):
    """Their attribute(max_feature_nodes=60): logit rows, then features ranked by
    partial influence in batches; the same features chosen, the same rows, the
    graph's feature nodes only those (their column read). A cross-layer
    feature's row and influence sum over every MLP output it writes to."""
    folder = circuit_tracer_graphs["partial", architecture, dtype, kind]
    theirs = load_file(folder / "theirs.safetensors")
    model, _ = random_case(dtype, architecture, kind, seed=1)
    ours = attribution_graph(model, load_transcoders(folder / "transcoders"), TOKENS, **PARTIAL)
    assert ours.n_features == PARTIAL["max_feature_nodes"] < ours.active_features.shape[0]
    # Not simply the first features in node order: the influence ranking chose them.
    assert not torch.equal(ours.selected_features, torch.arange(ours.n_features))
    assert_equals_theirs(ours, theirs, dtype)


def test_bad_arguments_name_themselves():
    model, transcoders = random_case(torch.float32)
    with pytest.raises(ValueError, match="transcoders: 2 given for a model of 3 layers"):
        attribution_graph(model, transcoders.transcoders[:2], TOKENS)
    with pytest.raises(ValueError, match="transcoders: read 'hook_resid_mid'"):
        attribution_graph(model, TranscoderSet(transcoders.transcoders, "hook_resid_mid", "hook_mlp_out"), TOKENS)
    with pytest.raises(TypeError, match=r"transcoders\[0\]: expected an interpkernels Transcoder"):
        attribution_graph(model, [object(), transcoders[1], transcoders[2]], TOKENS)
    with pytest.raises(ValueError, match="tokens: expected a 1-D"):
        attribution_graph(model, transcoders, TOKENS[None])
    with pytest.raises(ValueError, match="batch_size: expected an int >= 1"):
        attribution_graph(model, transcoders, TOKENS, batch_size=0)
    with pytest.raises(ValueError, match="update_interval: expected an int >= 1"):
        attribution_graph(model, transcoders, TOKENS, update_interval=0)
    with pytest.raises(ValueError, match="max_feature_nodes: expected None or an int >= 1"):
        attribution_graph(model, transcoders, TOKENS, max_feature_nodes=0)
    for share in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"edge_mass: expected a share in \(0, 1\]"):
            attribution_graph(model, transcoders, TOKENS, edge_mass=share)
    with pytest.raises(ValueError, match="transcoders: a cross-layer transcoder of 2 layers for a model of 3 layers"):
        attribution_graph(model, CrossLayerTranscoder(2, CONFIG["d_model"], LATENTS, TOP_K), TOKENS)
    _, clt = random_case(torch.float32, kind="clt")
    with pytest.raises(ValueError, match="transcoders: read 'hook_resid_mid'"):
        attribution_graph(model, HookedCrossLayerTranscoder(clt.transcoder, "hook_resid_mid"), TOKENS)


def test_influence_is_the_power_series_of_the_normalized_adjacency(monkeypatch):
    """circuit-tracer's compute_influence: w (A + A^2 + ...) = w ((I - A)^-1 - I)
    for the row-normalised |A| of an acyclic graph; in blocks of 7 edges (rows
    split across blocks) as in one."""
    torch.manual_seed(0)
    n = 30
    dense = torch.randn(n, n, dtype=torch.float64) * (torch.rand(n, n) < 0.3)
    dense = dense.tril(-1)  # acyclic: every edge runs from a lower-numbered source to a higher target
    adjacency = dense.to_sparse_csr()
    magnitudes = dense.abs()
    want_normalized = magnitudes / magnitudes.sum(1, keepdim=True).clamp(min=1e-10)
    weights = torch.zeros(n, dtype=torch.float64)
    weights[-3:] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    want = weights @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - want_normalized) - torch.eye(n))
    torch.testing.assert_close(pruning.influence(adjacency, weights), want)
    torch.testing.assert_close(pruning.row_sums(adjacency), magnitudes.sum(1))
    monkeypatch.setattr(pruning, "_BLOCK_EDGES", 7)
    torch.testing.assert_close(pruning.influence(adjacency, weights), want)
    # Only the edges of a mask: the power series of that pruned matrix.
    mask = torch.rand(adjacency.values().shape[0]) < 0.5
    masked = torch.zeros_like(dense)
    masked[dense != 0] = dense[dense != 0] * mask  # CSR and dense share the row-major order
    masked_normalized = masked.abs() / masked.abs().sum(1, keepdim=True).clamp(min=1e-10)
    want_masked = weights @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - masked_normalized) - torch.eye(n))
    torch.testing.assert_close(pruning.influence(adjacency, weights, mask), want_masked)
    with pytest.raises(RuntimeError, match="cycle"):
        pruning.influence(torch.ones(3, 3, dtype=torch.float64).to_sparse_csr(), torch.ones(3, dtype=torch.float64),
                          max_iter=50)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_score_threshold_by_selection_is_the_sorted_running_sums(dtype, monkeypatch):
    """circuit-tracer's find_threshold (sort descending, first running sum to reach
    the share), here by a histogram and the sort of one bucket: the same score,
    ties and zeros included."""
    torch.manual_seed(0)
    scores = (torch.rand(5000, dtype=dtype) ** 4) * (torch.rand(5000) < 0.7)
    scores[:500] = scores[500:1000]  # ties
    monkeypatch.setattr(pruning, "_BLOCK_EDGES", 999)
    assert pruning.score_threshold(scores, 1.0) == 0.0  # everything kept
    for share in (0.0, 0.1, 0.5, 0.8, 0.98, 0.999):
        ordered = torch.sort(scores, descending=True).values
        cumulative = ordered.cumsum(0, dtype=torch.float64)
        index = min(int(torch.searchsorted(cumulative, share * scores.sum(dtype=torch.float64))), 4999)
        assert pruning.score_threshold(scores, share) == ordered[index], share


def test_a_layer_without_active_features():
    model, transcoders = random_case(torch.float64)
    with torch.no_grad():
        transcoders[1].threshold.fill_(1e6)
    graph = attribution_graph(model, transcoders, TOKENS, **OPTIONS)
    assert graph.n_features > 0 and not bool((graph.active_features[:, 0] == 1).any())
    want = frozen_intervention_adjacency(model, transcoders, graph)
    assert (graph.adjacency.to_dense() - want).abs().max() <= 1e-10 * want.abs().max()


def naive_kept_edges(row: torch.Tensor, share: float) -> torch.Tensor:
    """The per-row reference: sort |A| descending, walk the running sum (float64)
    to the first entry where it reaches `share` of the total, keep every
    non-zero edge at least that large."""
    magnitudes = row.abs()
    ordered = torch.sort(magnitudes, descending=True).values
    cumulative = ordered.cumsum(0, dtype=torch.float64)
    index = min(int(torch.searchsorted(cumulative, share * magnitudes.sum(dtype=torch.float64))),
                ordered.shape[0] - 1)
    return (magnitudes >= ordered[index]) & (magnitudes > 0)


def test_mass_thresholds_keep_what_a_per_row_sort_keeps():
    """Rows past topk's first guess (k = 256 grows), with ties, a zero row and
    a row whose mass sits in one entry."""
    torch.manual_seed(0)
    block = torch.randn(6, 3000) * (torch.rand(6, 3000) < 0.6)
    block[1] = block[1].round()  # ties everywhere
    block[2] = 0
    block[3, 17] = 1e6
    for share in (0.3, 0.9, 0.99, 0.999999):
        thresholds = attribution.mass_thresholds(block.abs(), share)
        for row in range(block.shape[0]):
            kept = (block[row].abs() >= thresholds[row]) & (block[row] != 0)
            assert torch.equal(kept, naive_kept_edges(block[row], share)), (share, row)
            total = block[row].abs().sum(dtype=torch.float64)
            assert block[row].abs()[kept].sum(dtype=torch.float64) >= share * total * (1 - 1e-12)
    assert not bool(((block[2].abs() >= attribution.mass_thresholds(block.abs(), 0.5)[2]) & (block[2] != 0)).any())


@pytest.mark.parametrize("share", [0.5, 0.9])
def test_edge_mass_keeps_each_rows_largest_edges(share):
    """edge_mass < 1: each row of the graph is the exact graph's row (edge_mass
    1, the oracle-checked one) cut by the per-row reference, so it holds at
    least that share of the row's absolute mass."""
    model, transcoders = random_case(torch.float64)
    exact = attribution_graph(model, transcoders, TOKENS, **OPTIONS).adjacency.to_dense()
    pruned = attribution_graph(model, transcoders, TOKENS, **OPTIONS, edge_mass=share).adjacency.to_dense()
    filled = exact.abs().sum(1) > 0
    assert int(filled.sum()) > 100
    for row in filled.nonzero().flatten().tolist():
        kept = naive_kept_edges(exact[row], share)
        assert torch.equal(pruned[row] != 0, kept), row
        assert torch.equal(pruned[row][kept], exact[row][kept])
        assert pruned[row].abs().sum() >= share * exact[row].abs().sum() * (1 - 1e-12)
    assert (pruned != 0).sum() < (exact != 0).sum()
    assert not bool(pruned[~filled].any())


def test_edges_are_the_adjacencys_nonzeros_row_major():
    graph = attribution_graph(*random_case(torch.float64, kind="clt"), TOKENS, **PARTIAL)
    targets, sources, weights = graph.edges()
    dense = graph.adjacency.to_dense()
    want_targets, want_sources = dense.nonzero(as_tuple=True)  # row-major
    assert targets.dtype == sources.dtype == torch.int64 and targets.shape[0] > 500
    assert torch.equal(targets, want_targets) and torch.equal(sources, want_sources)
    assert torch.equal(weights, dense[want_targets, want_sources])


def test_small_vector_jacobian_passes_give_the_same_graph(monkeypatch):
    """A memory budget of one row per pass splits every batch: the same graph."""
    model, transcoders = random_case(torch.float64)
    want = attribution_graph(model, transcoders, TOKENS, **OPTIONS).adjacency.to_dense()
    monkeypatch.setattr(attribution, "_PASS_MEMORY_BYTES", 1)
    got = attribution_graph(model, transcoders, TOKENS, **OPTIONS)
    assert torch.equal(got.adjacency.to_dense(), want)
    assert got.adjacency.col_indices().dtype == torch.int32 and got.adjacency.values().dtype == torch.float64


def test_progress_reports_rows_on_stderr_and_can_be_silenced(monkeypatch, capsys):
    from interpkernels._progress import Progress

    model, transcoders = random_case(torch.float64)
    monkeypatch.setattr(Progress, "PLAIN_LINE_SECONDS", 0.0)  # a line after every batch (stderr is not a terminal)
    graph = attribution_graph(model, transcoders, TOKENS, **OPTIONS)
    rows = graph.n_features + graph.logit_tokens.shape[0]
    assert f"attributed {rows:,} of {rows:,} rows" in capsys.readouterr().err
    attribution_graph(model, transcoders, TOKENS, **OPTIONS, progress=False)
    assert capsys.readouterr().err == ""
