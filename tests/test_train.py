"""interpkernels.train and the demo's pieces, at sizes that run in seconds."""

import itertools
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from interpkernels import demo
from interpkernels.distributed import load_checkpoint
from interpkernels.nn import JumpReLUSAE, JumpReLUTranscoder, TopKSAE, Transcoder
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_120", "step_60"]
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(64))
    # One layout for every module, sharded or not: a folder that load_checkpoint reads.
    final = load_checkpoint(tmp_path / "step_120")
    assert type(final) is TopKSAE and all(torch.equal(final.state_dict()[k], v) for k, v in sae.state_dict().items())


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


def test_the_sparsity_penalty_reaches_a_jumprelu_transcoder():
    """A JumpReLUTranscoder trains on fvu + sparsity_coefficient * l0, as a JumpReLUSAE does: a heavier
    penalty ends sparser (it once got no penalty at all)."""
    data = demo.SyntheticActivations.make(8, 16, 2.0, seed=0)
    mlp = torch.nn.Linear(8, 6)
    l0 = {}
    for coefficient in (0.0, 0.3):
        transcoder = JumpReLUTranscoder(8, 64, 64, d_out=6, seed=0)
        pairs = ((x, mlp(x).detach()) for x in data.batches(128))
        history = train(transcoder, pairs, steps=200, lr=1e-2, log_every=200, sparsity_coefficient=coefficient,
                        progress=False)
        l0[coefficient] = history.l0[-1]
    assert l0[0.3] < 0.5 * l0[0.0], l0


def test_memmap_batches_stream_rows_from_disk(tmp_path):
    rows = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    path = tmp_path / "acts.bin"
    rows.tofile(path)
    batches = memmap_batches(path, d=4, batch_size=10, shuffle_seed=None)
    first, second = next(batches), next(batches)
    assert torch.equal(first, torch.from_numpy(rows[:10])) and torch.equal(second, torch.from_numpy(rows[10:20]))


def test_memmap_batches_restore_their_position_and_split_among_replicas(tmp_path):
    path = tmp_path / "acts.bin"
    np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32).tofile(path)
    stream = list(itertools.islice(memmap_batches(path, d=4, batch_size=10, shuffle_seed=3), 17))  # 3+ epochs
    assert not all(torch.equal(a, b) for a, b in zip(stream[:5], stream[5:10]))  # each epoch its own order
    replica = list(itertools.islice(memmap_batches(path, 4, 10, shuffle_seed=3, stride=3, offset=1), 6))
    assert all(torch.equal(a, b) for a, b in zip(replica, stream[1::3], strict=True))
    resumed = memmap_batches(path, 4, 10, shuffle_seed=3)
    resumed.load_state_dict({"position": 12})
    assert all(torch.equal(a, b) for a, b in zip(itertools.islice(resumed, 5), stream[12:], strict=True))
    resumed.load_state_dict({"position": 2})  # backwards too: the shuffles are replayed from the seed
    assert torch.equal(next(resumed), stream[2]) and resumed.state_dict() == {"position": 3}
    with pytest.raises(ValueError, match="expected 0 <= offset < stride, got offset=2, stride=2"):
        memmap_batches(path, 4, 10, stride=2, offset=2)


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


# A training run in a fresh process: checkpoints every 4 of 12 steps on memmap data of 5
# batches per epoch (the shuffle replayed across epochs), AuxK on (latents die within 64
# tokens). It SIGKILLs itself as it takes batch kill_at_batch, or as it calls os.rename or
# shutil.rmtree (kill_at: [function, name]) to make or remove a folder of that name.
TRAINING_CHILD = """
import json, os, shutil, signal, sys
from pathlib import Path
import torch
from interpkernels import train as training
from interpkernels.nn import TopKSAE

args = json.loads(sys.argv[1])
torch.set_num_threads(1)
take_batch, rename, rmtree = training.MemmapBatches.__next__, os.rename, shutil.rmtree

def die_at(function, path):
    if args["kill_at"] == [function, Path(path).name]:
        os.kill(os.getpid(), signal.SIGKILL)

def take_batch_or_die(batches):
    if batches.position == args["kill_at_batch"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return take_batch(batches)

def rename_or_die(source, target):
    die_at("rename", target)
    rename(source, target)

def rmtree_or_die(path, **options):
    die_at("rmtree", path)
    rmtree(path, **options)

training.MemmapBatches.__next__, os.rename, shutil.rmtree = take_batch_or_die, rename_or_die, rmtree_or_die
sae = TopKSAE(16, 64, 4, seed=0)
history = training.train(sae, training.memmap_batches(args["data"], 16, 32, shuffle_seed=1), steps=12, lr=3e-3,
                         log_every=2, dead_after_tokens=64, checkpoint_dir=args["checkpoints"], checkpoint_every=4,
                         keep_checkpoints=args["keep"], resume=args["resume"], progress=False)
assert any(loss > 0 for loss in history.auxk_loss)
torch.save(sae.state_dict(), args["out"])
"""


def run_training_child(directory, resume=False, kill_at_batch=None, kill_at=None, keep=2):
    arguments = dict(data=str(directory.parent / "acts.f32"), checkpoints=str(directory / "checkpoints"),
                     out=str(directory / "final.pt"), resume=resume, kill_at_batch=kill_at_batch, kill_at=kill_at,
                     keep=keep)
    return subprocess.run([sys.executable, "-c", TRAINING_CHILD, json.dumps(arguments)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
    """The run never stopped, every checkpoint kept."""
    root = tmp_path_factory.mktemp("resume")
    np.random.default_rng(0).standard_normal((160, 16)).astype(np.float32).tofile(root / "acts.f32")
    directory = root / "uninterrupted"
    directory.mkdir()
    finished = run_training_child(directory, keep=10)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return directory


@pytest.mark.parametrize("name, kill, checkpoints_left", [
    ("mid-run", dict(kill_at_batch=10), ["step_4", "step_8"]),
    ("publishing-step-8", dict(kill_at=["rename", "step_8"]), ["step_4"]),
    ("removing-step-4", dict(kill_at=["rmtree", ".step_4.removed"]), ["step_12", "step_8"]),
])
def test_a_run_killed_and_resumed_ends_bit_identical_to_an_uninterrupted_one(uninterrupted_run, name, kill,
                                                                             checkpoints_left):
    directory = uninterrupted_run.parent / name
    directory.mkdir()
    killed = run_training_child(directory, **kill)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # Whatever the kill cut short, every step_<n> folder left is that step's checkpoint, whole.
    checkpoints = directory / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith("step_")) == checkpoints_left
    for folder in checkpoints_left:
        got, want = load_checkpoint(checkpoints / folder), load_checkpoint(uninterrupted_run / "checkpoints" / folder)
        assert all(torch.equal(got.state_dict()[key], value) for key, value in want.state_dict().items()), folder
    resumed = run_training_child(directory, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got, want = torch.load(directory / "final.pt"), torch.load(uninterrupted_run / "final.pt")
    assert all(torch.equal(got[key], value) for key, value in want.items())
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_12", "step_8"]  # the last 2, nothing unfinished


def test_resume_fast_forwards_other_iterables(tmp_path, capsys):
    """A generator cannot save its position: the resumed run draws and drops the batches done."""
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    settings = dict(lr=3e-3, log_every=3, dead_after_tokens=128, progress=False)
    uninterrupted = TopKSAE(16, 128, 4, seed=0)
    expected = train(uninterrupted, demo.SyntheticActivations.make(16, 32, 2.0, seed=0).batches(64), steps=9,
                     **settings)
    first = TopKSAE(16, 128, 4, seed=0)
    train(first, data.batches(64), steps=6, checkpoint_dir=tmp_path, checkpoint_every=3, **settings)
    resumed = TopKSAE(16, 128, 4, seed=5)  # other initial weights: the checkpoint replaces them
    capsys.readouterr()
    history = train(resumed, demo.SyntheticActivations.make(16, 32, 2.0, seed=0).batches(64), steps=9,
                    checkpoint_dir=tmp_path, checkpoint_every=3, resume=True, **{**settings, "progress": True})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("step 7/9  ") and lines[-1].startswith("step 9/9  ")  # counted from the resumed step
    assert all(torch.equal(resumed.state_dict()[key], value) for key, value in uninterrupted.state_dict().items())
    assert history.steps == expected.steps == [3, 6, 9] and history.fvu == expected.fvu
    assert history.dead_latents == expected.dead_latents and any(loss > 0 for loss in history.auxk_loss)


def test_resume_and_checkpoint_folder_mistakes_are_refused(tmp_path):
    data = demo.SyntheticActivations.make(16, 32, 2.0, seed=0)
    train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=4, checkpoint_dir=tmp_path, checkpoint_every=2,
          progress=False)
    with pytest.raises(ValueError, match=r"holds checkpoints already \(\['step_2', 'step_4'\]\); pass resume=True"):
        train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=4, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="step_4, is past steps=3"):
        train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=3, checkpoint_dir=tmp_path, resume=True,
              progress=False)
    with pytest.raises(ValueError, match="holds a TopKSAE .* not this TopKSAE"):
        train(TopKSAE(16, 32, 4, seed=0), data.batches(64), steps=6, checkpoint_dir=tmp_path, resume=True,
              progress=False)
    with pytest.raises(ValueError, match="resume: needs the checkpoint_dir"):
        train(TopKSAE(16, 64, 4, seed=0), data.batches(64), steps=4, resume=True, progress=False)


def test_a_nonfinite_loss_stops_training_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    batches = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    batches[6][3, 5] = float("nan")  # one value of the batch of step 7
    sae = TopKSAE(16, 64, 4, seed=0)
    with pytest.raises(FloatingPointError, match=re.escape(
            f"non-finite (NaN or inf) at step 7; the last good checkpoint is {tmp_path / 'step_4'}")):
        train(sae, batches, steps=12, lr=3e-3, log_every=10, checkpoint_dir=tmp_path, checkpoint_every=4,
              progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4"]  # step 8 wrote nothing
    assert all(value.isfinite().all() for value in load_checkpoint(tmp_path / "step_4").state_dict().values())
    with pytest.raises(FloatingPointError, match="at step 7; no checkpoint was written before it"):
        train(TopKSAE(16, 64, 4, seed=0), batches, steps=12, lr=3e-3, log_every=10, progress=False)
