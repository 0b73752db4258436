"""interpkernels.integrations.circuit_tracer.attribute, the drop-in for
circuit-tracer 0.5.0's attribute() (circuit_tracer/attribution/attribute.py),
against their attribute() itself on the same ReplacementModel and prompt, run
in circuit-tracer's environment where both import
(tests/circuit_tracer_dropin_side.py): every field of the returned Graph
(adjacency within 1e-4 of the largest edge in float32, 1e-12 in float64;
features, logits, probabilities, activations, tokens, strings, config), their
prune_graph and compute_graph_scores on it, and their create_graph_files'
JSON of it, on the random cases of tests/test_graphs_attribution.py, one of
them with max_feature_nodes and update_interval set.
"""

import json
import sys
import types

import pytest
import torch
from circuit_tracer_env import DROPIN_SIDE_SCRIPT, run_circuit_tracer
from safetensors.torch import load_file
from test_graphs_attribution import OPTIONS, PARTIAL, TOKENS, random_case, write_case
from test_graphs_export import THRESHOLDS, assert_same_frontend_graph, assert_same_tensors

from interpkernels.graphs import attribution_graph
from interpkernels.graphs.transcoders import THRESHOLD_KEY, transcoder_from_tensors
from interpkernels.integrations import circuit_tracer as dropin

# A text prompt, tokenized by their ensure_tokenized (which puts the pad token,
# the last id, first), through a lazily loaded decoder; ids that start with
# BOS (kept as they are), through resident weights with a skip connection; and
# max_feature_nodes with update_interval passed on (their re-ranked schedule).
# (architecture, dtype, transcoder kind, the side's dropin settings, attribute() keywords)
CASES = {
    "gpt2-float32-text-lazy": ("gpt2", torch.float32, "plain",
                               dict(prompt="w5 w9 w3 w17 w5 w2", text_prompts=True, lazy_decoder=True), OPTIONS),
    "llama-float64-ids-skip": ("llama", torch.float64, "skip",
                               dict(prompt=TOKENS.tolist(), text_prompts=False, lazy_decoder=False), OPTIONS),
    "gpt2-float64-ids-max-feature-nodes": ("gpt2", torch.float64, "plain",
                                           dict(prompt=TOKENS.tolist(), text_prompts=False, lazy_decoder=False),
                                           PARTIAL),
}
PAD = 23  # the text-prompt tokenizer's pad token (circuit_tracer_side.word_level_tokenizer)


@pytest.fixture(scope="module")
def dropin_graphs(tmp_path_factory) -> dict:
    """Each case's folder after circuit_tracer_dropin_side.py, all cases in one run."""
    folders = {}
    for name, (architecture, dtype, kind, settings, options) in CASES.items():
        folder = folders[name] = tmp_path_factory.mktemp(f"dropin-{name}")
        write_case(folder, architecture, dtype, kind, frontend=THRESHOLDS, dropin=settings, attribute=options)
    run_circuit_tracer(*folders.values(), script=DROPIN_SIDE_SCRIPT, with_interpkernels=True)
    return folders


@pytest.mark.parametrize("case", CASES)
def test_graph_equals_their_attribute(case, dropin_graphs):
    folder, dtype = dropin_graphs[case], CASES[case][1]
    tensors = load_file(folder / "graphs.safetensors")
    fields = json.loads((folder / "graphs.json").read_text())
    assert fields["ours"] == fields["theirs"]  # strings, logit targets, vocabulary size, scan, config
    assert_same_tensors(tensors, "ours", "theirs", dtype)
    # The same edges exist: none of theirs is missing here beyond rounding.
    ours, theirs = tensors["ours.adjacency_matrix"], tensors["theirs.adjacency_matrix"]
    assert ((theirs != 0) & (ours == 0)).sum() == 0 and (theirs != 0).sum() > 500
    assert tensors["ours.active_features"].shape[0] > 20
    if "max_feature_nodes" in CASES[case][4]:  # their schedule's features, not all
        assert tensors["theirs.selected_features"].shape[0] == PARTIAL["max_feature_nodes"]
    # The text is TOKENS after their BOS: their ensure_tokenized puts the pad token there instead.
    want_tokens = [PAD] + TOKENS[1:].tolist() if isinstance(CASES[case][3]["prompt"], str) else TOKENS.tolist()
    assert tensors["theirs.input_tokens"].tolist() == want_tokens


@pytest.mark.parametrize("case", CASES)
def test_their_create_graph_files_takes_it(case, dropin_graphs):
    folder = dropin_graphs[case]
    assert_same_frontend_graph(folder / "ours_json", folder / "theirs_json", CASES[case][1])


def test_options_the_engine_lacks_name_themselves():
    model = types.SimpleNamespace(backend="transformerlens")
    with pytest.raises(NotImplementedError, match="offload: interpkernels.graphs.attribution_graph does not take"):
        dropin.attribute("w5", model, offload="cpu")
    with pytest.raises(NotImplementedError, match="attribution_targets: "):
        dropin.attribute("w5", model, attribution_targets=torch.tensor([3]))
    with pytest.raises(NotImplementedError, match="model: backend 'nnsight'"):
        dropin.attribute("w5", types.SimpleNamespace(backend="nnsight"))


def test_to_circuit_tracer_says_where_circuit_tracer_is_needed(monkeypatch):
    model, transcoders = random_case(torch.float64)
    graph = attribution_graph(model, transcoders, TOKENS, progress=False)
    monkeypatch.setitem(sys.modules, "circuit_tracer", None)  # not importable, wherever this runs
    with pytest.raises(ImportError, match="to_circuit_tracer needs circuit-tracer importable"):
        graph.to_circuit_tracer(model)


def test_transcoder_from_tensors_holds_the_same_tensors():
    generator = torch.Generator().manual_seed(0)
    tensors = {"W_enc": torch.randn(6, 4, generator=generator), "W_dec": torch.randn(6, 4, generator=generator),
               "b_enc": torch.randn(6, generator=generator), "b_dec": torch.randn(4, generator=generator),
               THRESHOLD_KEY: torch.rand(6, generator=generator)}
    transcoder = transcoder_from_tensors(tensors)
    for name, tensor in tensors.items():
        assert getattr(transcoder, name.removeprefix("activation_function.")).data_ptr() == tensor.data_ptr(), name
    del tensors[THRESHOLD_KEY]
    assert torch.equal(transcoder_from_tensors(tensors).threshold, torch.zeros(6))  # ReLU: no threshold
    with pytest.raises(ValueError, match=r"layer 3: activation_function.threshold has shape \(\), expected \(6,\)"):
        transcoder_from_tensors({**tensors, THRESHOLD_KEY: torch.tensor(0.5)}, where="layer 3")
