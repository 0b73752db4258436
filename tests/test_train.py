"""interpkernels.train and the demo's pieces, at sizes that run in seconds."""

import re

import numpy as np
import pytest
import torch

from interpkernels import demo
from interpkernels.nn import JumpReLUSAE, TopKSAE, Transcoder
from interpkernels.train import DeadLatentCounter, ProgressDisplay, memmap_batches, train


def test_dead_latent_counter_counts_tokens_since_firing():
    counter = DeadLatentCounter(5, torch.device("cpu"))
    counter.update(torch.tensor([[1.0, 0.0], [2.0, 3.0]]), torch.tensor([[0, 1], [0, 2]]))
    assert counter.tokens_since_fired.tolist() == [0, 2, 0, 2, 2]  # latent 1 only had a zero value
    counter.update(torch.tensor([[1.0]]), torch.tensor([[4]]))
    assert counter.tokens_since_fired.tolist() == [1, 3, 1, 3, 0]
    assert counter.dead_mask(3).tolist() == [False, True, False, True, False]


def test_training_reduces_fvu_and_writes_checkpoints(tmp_path):
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    sae = TopKSAE(16, 64, 4, seed=0)
    history = train(sae, data.batches(256), steps=120, lr=3e-3, log_every=20, dead_after_tokens=5000,
                    checkpoint_dir=tmp_path, checkpoint_every=60, progress=False)
    assert history.steps == [20, 40, 60, 80, 100, 120]
    assert history.fvu[-1] < 0.5 * history.fvu[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_120.safetensors", "step_60.safetensors"]
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))


def test_auxk_runs_once_latents_are_dead():
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    sae = TopKSAE(16, 128, 4, seed=0)  # 4x more latents than features: some die
    history = train(sae, data.batches(256), steps=60, lr=3e-3, log_every=20, dead_after_tokens=1000, progress=False)
    assert history.dead_latents[0] > 0
    assert history.auxk_loss[0] == 0  # nothing was known dead before the first check
    assert all(loss > 0 for loss in history.auxk_loss[1:])


def test_training_jumprelu_and_transcoders_under_bf16_autocast():
    data = demo.SyntheticActivations.make(8, 16, 2.0, seed=0)
    jump = JumpReLUSAE(8, 32, 8, seed=0)
    history = train(jump, data.batches(128), steps=20, lr=1e-3, log_every=10, progress=False,
                    autocast_dtype=torch.bfloat16)
    assert all(np.isfinite(history.fvu))
    mlp = torch.nn.Linear(8, 6)
    pairs = ((x, mlp(x).detach()) for x in data.batches(128))
    transcoder = Transcoder(8, 32, 4, d_out=6, skip=True, seed=0)
    history = train(transcoder, pairs, steps=40, lr=3e-3, log_every=20, progress=False)
    assert history.fvu[-1] < history.fvu[0]


def test_memmap_batches_stream_rows_from_disk(tmp_path):
    rows = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    path = tmp_path / "acts.bin"
    rows.tofile(path)
    batches = memmap_batches(path, d=4, batch_size=10, shuffle_seed=None)
    first, second = next(batches), next(batches)
    assert torch.equal(first, torch.from_numpy(rows[:10])) and torch.equal(second, torch.from_numpy(rows[10:20]))


def test_memmap_batches_name_the_file_when_it_holds_fewer_rows_than_a_batch(tmp_path):
    path = tmp_path / "acts.bin"
    np.zeros((7, 4), dtype=np.float32).tofile(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: holds 7 rows of d=4, fewer than batch_size=10")):
        memmap_batches(path, d=4, batch_size=10)


def test_memmap_batches_name_the_file_when_its_size_is_not_whole_rows(tmp_path):
    path = tmp_path / "acts.bin"
    np.zeros(30, dtype=np.float32).tofile(path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: 120 bytes is not a whole number of rows of d=4 float32")):
        memmap_batches(path, d=4, batch_size=2)


def test_memmap_batches_reject_an_empty_batch(tmp_path):
    path = tmp_path / "acts.bin"
    np.zeros((7, 4), dtype=np.float32).tofile(path)
    with pytest.raises(ValueError, match="batch_size: expected at least 1, got 0"):
        memmap_batches(path, d=4, batch_size=0)


def test_progress_off_a_terminal_is_plain_lines_from_the_first_step(capsys):
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    history = train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=40, lr=3e-3, log_every=50,
                    dead_after_tokens=640)
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("step 1/40  fvu ")  # not only at the first log_every
    assert lines[-1].startswith("step 40/40  fvu ")
    assert f"dead {history.dead_latents[-1]} of 64" in lines[-1]


def test_progress_off_a_terminal_adds_a_line_every_interval(capsys, monkeypatch):
    monkeypatch.setattr(ProgressDisplay, "PLAIN_LINE_SECONDS", 0.0)
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=5, lr=3e-3, log_every=50)
    assert [line.split()[1] for line in capsys.readouterr().err.splitlines()] == ["1/5", "2/5", "3/5", "4/5", "5/5"]


def test_progress_on_a_terminal_is_a_tqdm_bar(fake_terminal):
    terminal = fake_terminal()
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    history = train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=40, lr=3e-3, log_every=50,
                    dead_after_tokens=640)
    final = terminal.getvalue().split("\r")[-1]
    assert "40/40" in final and "100%|" in final
    assert f"dead {history.dead_latents[-1]} of 64" in final
