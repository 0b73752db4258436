"""An attribution graph against a known circuit: induction (examples/induction_graph.py).

The two-layer model is the example's, trained by it (``python
examples/induction_graph.py``, seed 0, its default Config) and kept in
tests/data/induction_model.safetensors: training it takes minutes on one CPU
thread, past this suite's budget; the test first checks that it does
induction on held-out prompts. The transcoders are trained here with
interpkernels.train (fewer steps than the example), the graph built and
pruned on held-out ``… A B … A`` prompts.

Ground truth (the example's docstring says why): with attention frozen the
graph holds induction's value/output side, so the earlier B's token node is
the B logit's largest token source, a kept path joins them, and the effect
the graph gives it equals removing its embedding in the real model with
attention frozen and, because B's own embedding sets no attention pattern,
with attention live; at the final A, whose embedding is the query, the live
model's change is far larger than the graph's.
"""

import pathlib

import pytest
import torch
from safetensors.torch import load_file
from test_attribution_examples import load_example, quiet

MODEL = pathlib.Path(__file__).resolve().parent / "data" / "induction_model.safetensors"
# The suite runs one seed (15 s on one thread at load ~5); seeds 0-9 pass (docs/graphs.md). No skip:
# the example imports transformer_lens, a test dependency.
SEEDS = [0]


@pytest.fixture(scope="module")
def example():
    return load_example("induction_graph")


@pytest.fixture(scope="module")
def model(example):
    model = example.new_model(example.Config(), seed=0)
    model.load_state_dict(load_file(str(MODEL)))
    return model.eval()


def small_config(example):
    # The model's fields as the example's defaults; fewer transcoder steps on fewer sequences.
    return example.Config(transcoder_steps=600, harvest_sequences=1024)


def test_the_model_does_induction(example, model):
    accuracy, chance = example.induction_accuracy(small_config(example), model, 512, seed=0)
    assert accuracy > 0.8 > 10 * chance


@pytest.mark.parametrize("seed", SEEDS)
def test_graph_recovers_the_induction_path(example, model, seed):
    config = small_config(example)
    tokens, _ = example.sample(config, config.harvest_sequences, torch.Generator().manual_seed(seed))
    transcoders = [example.train_transcoder(config, rows, layer, seed, progress=False)
                   for layer, rows in enumerate(example.harvest(model, tokens))]
    outcome = example.analyse(config, model, transcoders, seed, {}, log=quiet)
    b = outcome.b_position
    final_a = outcome.a_positions[1]

    assert outcome.top_logit == outcome.answer  # the model answers B
    assert max(outcome.fvu) < 0.3
    # The earlier B is the B logit's largest token source, and a kept path joins them.
    assert outcome.token_influence_rank == 0
    assert outcome.influence_share > 0.25
    assert outcome.path is not None and outcome.path[0] == outcome.graph.token_node(b)
    # Signed effects on the B logit. Removing B's embedding lowers it, in the graph and in the real
    # model with attention frozen. The graph's figure, a linear one, falls short of the real model's
    # by what the transcoders miss (their error is held constant) and by features switching under
    # so large a change: with these transcoders to 0.35-0.95 of it (seeds 0-9), with the example's
    # to 0.73-0.99 (three models; docs/graphs.md).
    predicted, frozen, live = -outcome.graph_effects[b], outcome.frozen_effects[b], outcome.live_effects[b]
    assert predicted < 0 and frozen < 0
    assert 0.25 * abs(frozen) < abs(predicted) < 1.1 * abs(frozen)
    # B's own embedding sets no attention pattern that matters: live attention changes little.
    assert abs(live - frozen) < 0.25 * abs(frozen)
    # No other token but the two A's moves the B logit in the graph by a third of what B does.
    others = [p for p in range(1, outcome.tokens.shape[0]) if p not in (b, *outcome.a_positions)]
    assert outcome.graph_effects[others].abs().max() < abs(predicted) / 3
    # The final A is the query: live, removing it costs B far more than the frozen graph says.
    assert abs(outcome.live_effects[final_a]) > 3 * abs(outcome.graph_effects[final_a])
    # Semantics: put another token C in B's place and the model answers C, its B logit falls.
    assert outcome.replaced_top == outcome.replaced_by
    assert outcome.replaced_answer_change < 0
