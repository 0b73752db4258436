"""AttributionGraph.save_json and .to_circuit_tracer_file against circuit-tracer
0.5.0 itself, run in its own environment (tests/circuit_tracer_side.py's
frontend command), on the random cases of tests/test_graphs_attribution.py:

- the JSON validates against their frontend's pydantic Model
  (circuit_tracer/frontend/graph_models.py) and equals what their
  create_graph_files (circuit_tracer/utils/create_graph_files.py) writes for
  their own attribute() graph of the same weights and prompt, node for node and
  link for link, and so does the graph-metadata.json index beside it;
- the .pt file opens with their Graph.from_pt and equals their attribute()'s
  Graph field for field (their Graph.to_pt / from_pt, circuit_tracer/graph.py).
"""

import collections
import json

import pytest
import torch
from circuit_tracer_env import run_circuit_tracer
from safetensors.torch import load_file
from test_graphs_attribution import OPTIONS, TOKENS, random_case, write_case

from interpkernels.graphs import attribution_graph, load_transcoders

CASES = [("gpt2", torch.float32, "plain"), ("llama", torch.float64, "skip")]
CASE_IDS = ["gpt2-float32-plain", "llama-float64-skip"]
# circuit-tracer's defaults for create_graph_files.
THRESHOLDS = dict(node_threshold=0.8, edge_threshold=0.98)
FLOAT_FIELDS = ("influence", "activation", "token_prob")


def word_level_tokenizer(vocabulary_size: int):
    """The tokenizer circuit_tracer_side.py builds for the same vocabulary (token 0 is BOS)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocabulary = {"<bos>": 0, **{f"w{i}": i for i in range(1, vocabulary_size)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="w1")),
                                   bos_token="<bos>")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict:
    """Each case's folder: our graph.json (with graph-metadata.json) in ours/ and
    ours.pt, then circuit-tracer's frontend command on all of them in one run."""
    folders = {}
    for architecture, dtype, kind in CASES:
        folder = folders[architecture, dtype, kind] = tmp_path_factory.mktemp(f"export-{architecture}-{dtype}")
        write_case(folder, architecture, dtype, kind, frontend=THRESHOLDS)
        model, _ = random_case(dtype, architecture, kind, seed=1)
        transcoders = load_transcoders(folder / "transcoders")
        graph = attribution_graph(model, transcoders, TOKENS, **OPTIONS)
        tokenizer = word_level_tokenizer(model.cfg.d_vocab)
        (folder / "ours").mkdir()
        graph.save_json(folder / "ours" / "graph.json", tokenizer, scan=transcoders.scan, **THRESHOLDS)
        graph.to_circuit_tracer_file(folder / "ours.pt", model, tokenizer, scan=transcoders.scan)
    run_circuit_tracer("frontend", *folders.values())
    return folders


def assert_floats_close(got: float | None, want: float | None, dtype: torch.dtype, scale: float = 1.0):
    assert (got is None) == (want is None)
    if want is not None:
        tolerance = 1e-12 if dtype == torch.float64 else 1e-5
        assert abs(got - want) <= tolerance * max(scale, abs(want)), (got, want)


def links_by_ends(links: list[dict]) -> dict[tuple[str, str], list[float]]:
    weights = collections.defaultdict(list)
    for link in links:
        weights[link["source"], link["target"]].append(link["weight"])
    return {ends: sorted(values) for ends, values in weights.items()}


def assert_same_frontend_graph(ours_folder, theirs_folder, dtype: torch.dtype) -> None:
    """The graph.json and graph-metadata.json in two folders equal, node for node and
    link for link, floats within `dtype`'s tolerance (links: of the largest weight)."""
    ours = json.loads((ours_folder / "graph.json").read_text())
    theirs = json.loads((theirs_folder / "graph.json").read_text())
    assert list(ours) == list(theirs) == ["metadata", "qParams", "nodes", "links"]
    assert ours["metadata"] == theirs["metadata"] and ours["qParams"] == theirs["qParams"]

    # Their node ids can repeat across kinds (error "0_{layer}_{pos}" is also feature
    # "{layer}_{latent}_{pos}" of layer 0, latent = layer), so a node is its kind and id.
    our_nodes = {(node["feature_type"], node["node_id"]): node for node in ours["nodes"]}
    their_nodes = {(node["feature_type"], node["node_id"]): node for node in theirs["nodes"]}
    assert len(our_nodes) == len(ours["nodes"]) and set(our_nodes) == set(their_nodes)
    kinds = {kind for kind, _ in our_nodes}
    assert kinds == {"cross layer transcoder", "mlp reconstruction error", "embedding", "logit"}
    for key, want in their_nodes.items():
        got = our_nodes[key]
        assert list(got) == list(want)
        assert {k: v for k, v in got.items() if k not in FLOAT_FIELDS} == \
            {k: v for k, v in want.items() if k not in FLOAT_FIELDS}, key
        for field in FLOAT_FIELDS:
            assert_floats_close(got[field], want[field], dtype)

    # Links name nodes by id only, so two can share (source, target): each pair's weights, sorted.
    our_links, their_links = links_by_ends(ours["links"]), links_by_ends(theirs["links"])
    assert set(our_links) == set(their_links) and len(ours["links"]) == len(theirs["links"]) > 50
    largest = max(abs(link["weight"]) for link in theirs["links"])
    for ends, weights in their_links.items():
        assert len(our_links[ends]) == len(weights), ends
        for got, want in zip(our_links[ends], weights):
            assert_floats_close(got, want, dtype, scale=10 * largest)

    index = json.loads((ours_folder / "graph-metadata.json").read_text())
    assert index == json.loads((theirs_folder / "graph-metadata.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_json_equals_create_graph_files(case, exported):
    folder, dtype = exported[case], case[1]
    assert_same_frontend_graph(folder / "ours", folder / "theirs_json", dtype)
    # Their frontend's Model accepted ours whole.
    ours = json.loads((folder / "ours" / "graph.json").read_text())
    validated = json.loads((folder / "graphs.json").read_text())["validated"]
    assert validated == {"nodes": len(ours["nodes"]), "links": len(ours["links"])}


def assert_same_tensors(tensors: dict, got_prefix: str, want_prefix: str, dtype: torch.dtype) -> None:
    """Every ``want_prefix.name`` tensor equals ``got_prefix.name`` in dtype and
    shape, integers exactly, floats within `dtype`'s tolerance of the largest entry."""
    names = {name.removeprefix(f"{want_prefix}.") for name in tensors if name.startswith(f"{want_prefix}.")}
    assert names == {name.removeprefix(f"{got_prefix}.") for name in tensors if name.startswith(f"{got_prefix}.")}
    for name in names:
        got, want = tensors[f"{got_prefix}.{name}"], tensors[f"{want_prefix}.{name}"]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if want.is_floating_point():
            # float32: within 1e-4 of the largest entry, as test_graphs_attribution compares edges.
            tolerance = 1e-12 if dtype == torch.float64 else 1e-4
            assert (got - want).abs().max() <= tolerance * max(want.abs().max(), 1.0), name
        else:
            assert torch.equal(got, want), name


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pt_file_opens_as_their_graph(case, exported):
    folder, dtype = exported[case], case[1]
    fields = json.loads((folder / "graphs.json").read_text())
    tensors = load_file(folder / "graphs.safetensors")
    loaded, theirs = fields["loaded"], fields["theirs"]
    # Token strings are not in the file (see interpkernels.graphs.export): ids only.
    assert [vocab_idx for _, vocab_idx in loaded["logit_targets"]] == \
        [vocab_idx for _, vocab_idx in theirs["logit_targets"]]
    assert all(token == "" for token, _ in loaded["logit_targets"])
    del loaded["logit_targets"], theirs["logit_targets"]
    assert loaded == theirs
    assert theirs["cfg_type"] == "UnifiedConfig" and theirs["n_pos"] == TOKENS.shape[0]

    assert_same_tensors(tensors, "loaded", "theirs", dtype)


def test_bad_arguments_name_themselves(tmp_path):
    model, transcoders = random_case(torch.float64)
    graph = attribution_graph(model, transcoders, TOKENS, **OPTIONS)
    tokenizer = word_level_tokenizer(model.cfg.d_vocab)
    with pytest.raises(ValueError, match="scan: expected the transcoders' name"):
        graph.save_json(tmp_path / "graph.json", tokenizer, scan=None)
    with pytest.raises(ValueError, match="slug: expected a non-empty string"):
        graph.save_json(tmp_path / "graph.json", tokenizer, scan="scan", slug="")
    with pytest.raises(ValueError, match="tokenizer: the model has none"):
        graph.to_circuit_tracer_file(tmp_path / "graph.pt", model)
    assert not list(tmp_path.iterdir())
