"""interpkernels.distributed on gloo (CPU): latent-sharded coders against the
single-process module, data-parallel training, checkpoints across world sizes.

Each world size is one spawned run (process start-up costs seconds) that
runs all its checks on one process group; a check failing in any rank fails
the test with that rank's traceback. M = 31 latents: not divisible by 2 or 3.
"""

import ast
import copy
import graphlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from interpkernels.distributed import (
    load_checkpoint,
    load_sharded_checkpoint,
    process_group,
    save_checkpoint,
    shard_bounds,
    shard_latents,
)
from interpkernels.distributed import launch
from interpkernels.distributed.sharded import is_latent_rows
from interpkernels.nn import BatchTopKSAE, CrossLayerTranscoder, JumpReLUSAE, TopKSAE, Transcoder
from interpkernels.train import memmap_batches, train

D, M = 12, 31
TOLERANCES = {torch.float64: {}, torch.float32: dict(rtol=1e-5, atol=1e-6)}  # SPEC §6


def spawn(world_size: int, check, *args, store: Path, backend: str = "gloo") -> None:
    """Run check(rank, world_size, *args) in world_size processes on one process group
    (nccl: rank r on cuda:r)."""
    mp.spawn(_run_rank, args=(world_size, str(store), backend, check, args), nprocs=world_size)


def _run_rank(rank, world_size, store, backend, check, args):
    torch.set_num_threads(1)  # ranks share the machine's cores
    if backend == "nccl":
        torch.cuda.set_device(rank)
    with process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size):
        check(rank, world_size, *args)
    if backend == "gloo" and sys.platform == "linux":
        # Gloo threads alive at interpreter exit can abort the rank (distributed.process_group).
        threads = [(Path("/proc/self/task") / task / "comm").read_text().strip() for task in os.listdir("/proc/self/task")]
        assert not [name for name in threads if "gloo" in name], f"rank {rank}: gloo threads outlive the group: {threads}"


def coders(dtype: torch.dtype, device: str = "cpu") -> list:
    """One module of each shardable kind, random biases and thresholds (never zeros)."""
    generator = torch.Generator().manual_seed(11)
    modules = [TopKSAE(D, M, 4, k_aux=6, seed=1), BatchTopKSAE(D, M, 3, seed=2),
               JumpReLUSAE(D, M, 5, initial_threshold=0.5, bandwidth=0.2, seed=3),
               Transcoder(D, M, 4, d_out=7, skip=True, seed=4)]
    with torch.no_grad():
        for module in modules:
            for name, parameter in module.named_parameters():
                if name in ("b_enc", "b_dec", "W_skip", "log_threshold"):
                    parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return [module.to(device, dtype) for module in modules]


def check_against_unsharded(full, sharded, dtype, seed: int) -> None:
    """Forward outputs (indices exactly), grad_x and every parameter gradient."""
    generator = torch.Generator().manual_seed(seed)
    device = full.W_enc.device
    x = torch.randn(2, 5, D, generator=generator, dtype=dtype).to(device)  # leading dims kept
    target = torch.randn(2, 5, full.d_out, generator=generator, dtype=dtype).to(device) \
        if isinstance(full, Transcoder) else None
    dead_mask = (torch.rand(M, generator=generator) < 0.5).to(device)
    results = []
    for module in (full, sharded):
        module.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        out = module(x_leaf, target, dead_mask=dead_mask)
        # values enter the loss directly too: the code's replicated gradient path
        (out.fvu + out.auxk_loss + 0.1 * out.l0 + 0.01 * out.values.square().sum()).backward()
        results.append((out, x_leaf.grad))
    (expected, expected_grad_x), (got, got_grad_x) = results
    name = type(full).__name__
    assert torch.equal(got.indices, expected.indices), name
    assert expected.auxk_loss > 0 and expected.values.count_nonzero() > 0, name  # checks that can fail
    for field, want, have in zip(expected._fields, expected, got):
        torch.testing.assert_close(have, want, **TOLERANCES[dtype], msg=lambda m: f"{name}.{field}: {m}")
    torch.testing.assert_close(got_grad_x, expected_grad_x, **TOLERANCES[dtype])
    for param_name, parameter in full.named_parameters():
        want = parameter.grad[sharded.latent_slice] if is_latent_rows(param_name) else parameter.grad
        torch.testing.assert_close(getattr(sharded, param_name).grad, want, **TOLERANCES[dtype],
                                   msg=lambda m: f"{name}.{param_name}.grad: {m}")
    state = sharded.gather_state_dict()
    assert state.keys() == full.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in full.state_dict().items())


def cross_layer_transcoder() -> CrossLayerTranscoder:
    """3 layers, float64, random encoder and decoder biases (never zeros)."""
    module = CrossLayerTranscoder(3, D, M, 4, seed=6).double()
    generator = torch.Generator().manual_seed(41)
    with torch.no_grad():
        for bias in module.b_enc:
            bias.add_(0.3 * torch.randn(M, generator=generator, dtype=torch.float64))
        module.b_dec.add_(0.3 * torch.randn(module.b_dec.shape, generator=generator, dtype=torch.float64))
    return module


def check_cross_layer_transcoder(full: CrossLayerTranscoder) -> None:
    """Every layer's code (indices exactly), reconstructions, FVU, grad of every
    input and every parameter gradient equal the unsharded module's; the state gathers back."""
    sharded = shard_latents(full)
    generator = torch.Generator().manual_seed(42)
    inputs = [torch.randn(7, D, generator=generator, dtype=torch.float64) for _ in range(3)]
    targets = [torch.randn(7, D, generator=generator, dtype=torch.float64) for _ in range(3)]
    results = []
    for module in (full, sharded):
        module.zero_grad(set_to_none=True)
        leaves = [x.clone().requires_grad_() for x in inputs]
        out = module(leaves, targets)
        (out.fvu + 0.01 * out.values.square().sum()).backward()
        results.append((out, [x.grad for x in leaves]))
    (expected, expected_grads), (got, got_grads) = results
    assert torch.equal(got.indices, expected.indices) and expected.values.count_nonzero() > 0
    for field, want, have in zip(expected._fields, expected, got):
        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"CLT.{field}: {m}")
    for want, have in zip(expected_grads, got_grads, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-12, atol=1e-12)
    for name, parameter in full.named_parameters():
        want = parameter.grad[sharded.latent_slice] if is_latent_rows(name) else parameter.grad
        torch.testing.assert_close(sharded.get_parameter(name).grad, want, rtol=1e-12, atol=1e-12,
                                   msg=lambda m: f"CLT.{name}.grad: {m}")
    state = sharded.gather_state_dict()
    assert state.keys() == full.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in full.state_dict().items())
    assert type(sharded.unsharded()) is CrossLayerTranscoder


def check_ties_and_nan(world_size: int) -> None:
    """Exact ties across shard boundaries go to the lower global index; a NaN row keeps NaN first."""
    full = TopKSAE(D, M, 4, seed=5)
    tied = [3, 12, 20, 25, 30]  # spread over the shards of 2 and of 3 ranks
    with torch.no_grad():
        full.W_enc[tied] = full.W_enc[0].clone()
        full.b_enc[tied] = 5.0  # above every other latent
    sharded = shard_latents(full)
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(8))
    x[4] = float("nan")
    for module in (full, sharded):
        values, indices = module.encode(x)
        assert indices[[0, 1, 2, 3, 5]].tolist() == [tied[:4]] * 5
        assert indices[4].tolist() == [0, 1, 2, 3] and values[4].isnan().all()
        assert (values[[0, 1, 2, 3, 5]] > 4).all()
    assert {shard_bounds(M, world_size, r).start for r in range(world_size)} - {0}  # the ties do cross shards


def check_bf16_autocast() -> None:
    """Under bf16 autocast: the same code; the reconstruction's error (against
    float64) at most twice the unsharded module's (SPEC §6)."""
    full = TopKSAE(32, 101, 8, seed=12)
    sharded = shard_latents(full)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = full(x), sharded(x)
    exact = copy.deepcopy(full).double()(x.double()).reconstruction
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.values, expected.values)
    error = (got.reconstruction.double() - exact).abs().max()
    assert error <= 2 * (expected.reconstruction.double() - exact).abs().max()


def check_training(rank: int, world_size: int) -> dict:
    """train() on the sharded module gives single-process training's parameters; AuxK runs."""
    batches = [torch.randn(8, D, generator=torch.Generator().manual_seed(100 + i), dtype=torch.float64)
               for i in range(5)]
    trained = {}
    for full in (TopKSAE(D, M, 4, k_aux=6, seed=7), JumpReLUSAE(D, M, 4, initial_threshold=0.3, seed=8)):
        full = full.double()
        sharded = shard_latents(full)
        settings = dict(steps=5, lr=1e-2, dead_after_tokens=8, log_every=1, progress=False)
        expected_history = train(full, batches, **settings)
        history = train(sharded, batches, **settings)
        name = type(full).__name__
        assert any(loss > 0 for loss in expected_history.auxk_loss), name
        assert history.fvu == pytest.approx(expected_history.fvu, rel=1e-9), name
        state = sharded.gather_state_dict()
        for key, value in full.state_dict().items():
            torch.testing.assert_close(state[key], value, msg=lambda m: f"{name}.{key}: {m}")
        # Step 1 has no AuxK: three gathers of N * k candidates per rank (values,
        # keys, indices; 8 bytes each in float64), never [N, M].
        padded_k = min(full.k, shard_bounds(M, world_size, 0).stop)
        assert history.bytes_gathered[0] == 3 * world_size * 8 * padded_k * 8, name
        assert 0 < history.bytes_reduced[0], name
        trained[name] = (full, sharded)
    return trained


def train_on_mean_loss(module, steps: list[list[torch.Tensor]], lr: float) -> None:
    """Single-process data parallelism: per step, Adam on the mean of the replicas' FVUs."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    for replica_batches in steps:
        loss = sum(module(x).fvu for x in replica_batches) / len(replica_batches)
        optimizer.zero_grad()
        loss.backward()
        module.remove_decoder_parallel_gradient_()
        optimizer.step()
        module.normalize_decoder_()


def check_data_parallel(rank: int, world_size: int) -> None:
    """DDP over the world: the parameters of single-process steps on the mean of the ranks' losses."""
    batches = [[torch.randn(8, D, generator=torch.Generator().manual_seed(200 + 10 * step + r), dtype=torch.float64)
                for r in range(world_size)] for step in range(3)]
    module = TopKSAE(D, M, 4, seed=9).double()
    reference = copy.deepcopy(module)
    history = train(module, [step[rank] for step in batches], steps=3, lr=1e-2, dead_after_tokens=10**9,
                    progress=False, data_parallel_group=dist.group.WORLD)
    train_on_mean_loss(reference, batches, lr=1e-2)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(module.state_dict()[key], value, msg=lambda m: f"{key}: {m}")
    parameter_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    assert history.bytes_reduced[-1] == parameter_bytes + M  # gradients + the dead-latent mask (uint8)


def check_resume(rank: int, world_size: int, directory: Path, data: Path) -> None:
    """train-distributed stopped at step 4 and resumed with --resume ends bit-identical to a run of
    6 steps, on both meshes of 2 ranks; its checkpoints load in one process; another mesh is refused."""
    flags = ["--data", str(data), "--width", "16", "--latents", "37", "--k", "4", "--batch-size", "32", "--lr", "0.01",
             "--log-every", "2", "--checkpoint-every", "2", "--keep-checkpoints", "2"]
    for shards in ("1", "2"):  # 2 data-parallel x 1 latent shard, 1 x 2
        def run(steps: int, out: str, *extra: str) -> None:
            mesh = flags + ["--latent-shards", shards, "--steps", str(steps), "--out", str(directory / out)]
            launch.run(launch.build_parser().parse_args(mesh + list(extra)), torch.device("cpu"))
            dist.barrier()  # replica 0 alone writes final/: done before any rank reads it


        run(6, f"uninterrupted-{shards}")
        run(4, f"resumed-{shards}")
        run(6, f"resumed-{shards}", "--resume")
        expected = load_checkpoint(directory / f"uninterrupted-{shards}" / "final").state_dict()
        for checkpoint in ("final", "step_6", "step_4"):
            got = load_checkpoint(directory / f"resumed-{shards}" / checkpoint).state_dict()
            assert all(torch.equal(got[key], value) for key, value in expected.items()) == (checkpoint != "step_4")
    with pytest.raises(ValueError, match="written by 1 data-parallel x 2 latent ranks, this run has 2 x 1"):
        launch.run(launch.build_parser().parse_args(flags + ["--latent-shards", "1", "--steps", "8", "--resume",
                                                             "--out", str(directory / "resumed-2")]),
                   torch.device("cpu"))


def two_rank_checks(rank: int, world_size: int, checkpoint_dir: str, data: str) -> None:
    for dtype in (torch.float64, torch.float32):
        for seed, full in enumerate(coders(dtype)):
            check_against_unsharded(full, shard_latents(full), dtype, seed)
    check_ties_and_nan(world_size)
    check_bf16_autocast()
    trained = check_training(rank, world_size)
    check_data_parallel(rank, world_size)
    full, sharded = trained["JumpReLUSAE"]
    save_checkpoint(sharded, checkpoint_dir)
    if rank == 0:
        torch.save(full.state_dict(), Path(checkpoint_dir) / "expected.pt")
    clt = cross_layer_transcoder()
    check_cross_layer_transcoder(clt)
    save_checkpoint(shard_latents(clt), Path(checkpoint_dir).parent / "cross-layer")
    check_resume(rank, world_size, Path(checkpoint_dir).parent / "resume", Path(data))


def three_rank_checks(rank: int, world_size: int, checkpoint_dir: str) -> None:
    assert [shard_bounds(M, 3, r) for r in range(3)] == [slice(0, 11), slice(11, 21), slice(21, 31)]
    for seed, full in enumerate(coders(torch.float64)):
        check_against_unsharded(full, shard_latents(full), torch.float64, seed)
    check_ties_and_nan(world_size)
    # A checkpoint written by 2 ranks, loaded by 3: each reads only its rows.
    full = load_checkpoint(checkpoint_dir)
    sharded = load_sharded_checkpoint(checkpoint_dir)
    assert sharded.latent_slice == shard_bounds(M, 3, rank) and sharded.log_threshold.shape == (10 + (rank == 0),)
    state = sharded.gather_state_dict()
    assert all(torch.equal(state[key], value) for key, value in full.state_dict().items())
    rebuilt = sharded.unsharded()
    assert type(rebuilt) is JumpReLUSAE
    assert all(torch.equal(rebuilt.state_dict()[key], value) for key, value in full.state_dict().items())
    check_against_unsharded(full, sharded, torch.float64, seed=50)
    # A cross-layer transcoder: sharded 3 ways, and its checkpoint of 2 ranks read by 3.
    check_cross_layer_transcoder(cross_layer_transcoder())
    clt_directory = Path(checkpoint_dir).parent / "cross-layer"
    full_clt, sharded_clt = load_checkpoint(clt_directory), load_sharded_checkpoint(clt_directory)
    assert type(full_clt) is CrossLayerTranscoder and sharded_clt.latent_slice == shard_bounds(M, 3, rank)
    assert all(torch.equal(value, cross_layer_transcoder().state_dict()[key]) for key, value in full_clt.state_dict().items())
    assert all(torch.equal(sharded_clt.gather_state_dict()[key], value) for key, value in full_clt.state_dict().items())


@pytest.fixture(scope="module")
def checkpoint_of_two_ranks(tmp_path_factory):
    """The 2-rank run (all its checks); leaves a checkpoint written by 2 ranks."""
    directory = tmp_path_factory.mktemp("distributed")
    np.random.default_rng(1).standard_normal((200, 16)).astype(np.float32).tofile(directory / "acts.f32")
    spawn(2, two_rank_checks, str(directory / "checkpoint"), str(directory / "acts.f32"), store=directory / "store")
    return directory / "checkpoint"


def test_two_ranks_match_single_process(checkpoint_of_two_ranks):
    assert sorted(p.name for p in checkpoint_of_two_ranks.iterdir()) == [
        "expected.pt", "index.json", "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]


def test_checkpoint_of_two_ranks_loads_in_one_process(checkpoint_of_two_ranks):
    module = load_checkpoint(checkpoint_of_two_ranks)
    assert isinstance(module, JumpReLUSAE)
    expected = torch.load(checkpoint_of_two_ranks / "expected.pt")
    for key, value in expected.items():
        torch.testing.assert_close(module.state_dict()[key], value)
    assert all(p.requires_grad for p in module.parameters())


def test_three_ranks_uneven_shards_and_checkpoint_of_two(checkpoint_of_two_ranks, tmp_path):
    spawn(3, three_rank_checks, str(checkpoint_of_two_ranks), store=tmp_path / "store")


def test_train_distributed_command_matches_single_process(tmp_path):
    """torchrun on a 2 x 2 mesh (data x latent): the final checkpoint equals one
    process stepping on the mean loss of the two replicas' batches."""
    data = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
    data.tofile(tmp_path / "acts.f32")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               "-m", "interpkernels", "train-distributed", "--data", str(tmp_path / "acts.f32"), "--width", "16",
               "--latents", "37", "--k", "4", "--latent-shards", "2", "--batch-size", "64", "--steps", "6",
               "--lr", "0.01", "--log-every", "2", "--out", str(tmp_path / "run")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    assert "2 data-parallel x 2 latent shards" in finished.stderr
    assert (tmp_path / "run" / "history.json").is_file()
    reference = TopKSAE(16, 37, 4, seed=0)
    stream = memmap_batches(tmp_path / "acts.f32", 16, 64, shuffle_seed=0)
    train_on_mean_loss(reference, [[next(stream), next(stream)] for _ in range(6)], lr=0.01)
    trained = load_checkpoint(tmp_path / "run" / "final")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=1e-5, atol=1e-6)


# One rank of `train-distributed --latent-shards 2` on 2 ranks, launched as torchrun would
# (its environment variables, without the agent, whose start costs seconds); rank 1 sends
# itself `signal` as it takes its 3rd batch. The ranks start the command together, imports
# done: on a loaded machine one can lag the other by more than a short --timeout.
RANK_CHILD = """
import os, signal, sys, time
from pathlib import Path
import torch._dynamo
from interpkernels import train as training
from interpkernels.distributed import launch

take_batch = training.MemmapBatches.__next__

def take_batch_or_stop(batches):
    if os.environ["RANK"] == "1" and batches.position == 2:
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    return take_batch(batches)

training.MemmapBatches.__next__ = take_batch_or_stop
ready = Path(sys.argv[2])
(ready / os.environ["RANK"]).touch()
while len(list(ready.iterdir())) < 2:
    time.sleep(0.05)
launch.main(sys.argv[3:])
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("rank_signal", ["SIGSTOP", "SIGKILL"])
def test_train_distributed_ends_when_a_rank_stops_answering(tmp_path, rank_signal):
    """A stopped rank: the other ends within --timeout with an error saying so; a killed one: at once."""
    np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32).tofile(tmp_path / "acts.f32")
    timeout = 3 if rank_signal == "SIGSTOP" else 600
    flags = ["--data", str(tmp_path / "acts.f32"), "--width", "16", "--latents", "37", "--k", "4", "--batch-size",
             "32", "--steps", "8", "--latent-shards", "2", "--timeout", str(timeout), "--out", str(tmp_path / "run")]
    environment = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
    (tmp_path / "ready").mkdir()
    ranks = [subprocess.Popen([sys.executable, "-c", RANK_CHILD, rank_signal, str(tmp_path / "ready"), *flags],
                              stderr=subprocess.PIPE, text=True,
                              env=dict(environment, RANK=str(rank), LOCAL_RANK=str(rank)))
             for rank in range(2)]
    try:
        _, error = ranks[0].communicate(timeout=90)  # far below gloo's own 30 minutes
    finally:
        for rank in ranks:
            rank.kill()
            rank.communicate()
    assert ranks[0].returncode == 1, error[-3000:]
    timed_out = ("TimeoutError: rank 0: a collective waited longer than the process group's timeout (3 s) for the "
                 "other ranks: one has stopped answering (hung, stopped, or far slower than the others)")
    assert (timed_out in error) == (rank_signal == "SIGSTOP"), error[-3000:]


def nccl_checks(rank: int, world_size: int) -> None:
    for seed, full in enumerate(coders(torch.float32, f"cuda:{rank}")):
        check_against_unsharded(full, shard_latents(full), torch.float32, seed)


@pytest.mark.skipif(not dist.is_nccl_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs and NCCL")
def test_two_gpus_on_nccl_match_single_process(tmp_path):
    spawn(2, nccl_checks, store=tmp_path / "store", backend="nccl")


def test_shard_latents_refuses_what_it_cannot_shard(tmp_path, monkeypatch):
    with pytest.raises(RuntimeError, match="not initialized"):
        shard_latents(TopKSAE(D, M, 4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="module: expected one of"):
            shard_latents(torch.nn.Linear(D, M))
        sharded = shard_latents(TopKSAE(D, M, 4))
        assert sharded.latent_slice == slice(0, M)
        with pytest.raises(TypeError, match="already latent-sharded"):
            shard_latents(sharded)
        with pytest.raises(ValueError, match="dead_mask"):
            sharded(torch.randn(3, D), dead_mask=torch.zeros(M + 1, dtype=torch.bool))
        with pytest.raises(ValueError, match="x: expected a tensor of shape"):
            sharded.encode(torch.tensor(1.0))
        with pytest.raises(ValueError, match="k: expected 1 <= k <= M = 31"):
            shard_latents(TopKSAE(D, M, M + 1)).encode(torch.randn(3, D))
        save_checkpoint(TopKSAE(D, M, 4, seed=3), tmp_path / "one")
        assert torch.equal(load_sharded_checkpoint(tmp_path / "one").W_dec, TopKSAE(D, M, 4, seed=3).W_dec)
    finally:
        dist.destroy_process_group()
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_checkpoint(tmp_path)
    monkeypatch.delenv("RANK", raising=False)  # as outside torchrun
    with pytest.raises(SystemExit, match="run it under torchrun"):
        launch.main(["--data", "acts.f32", "--width", "4", "--latents", "8", "--k", "2", "--out", str(tmp_path)])


def test_a_checkpoint_overwritten_in_place_and_cut_short_fails_to_load(tmp_path, monkeypatch):
    """train-distributed rewrites final/ in place. Cut short after the new shard, before the
    new index, the old index would read the old M rows of the new file: a module that loads
    wrong. The old index is gone first instead."""
    from safetensors import torch as safetensors_torch

    save_checkpoint(TopKSAE(D, M, 4, seed=1), tmp_path)
    write_shard = safetensors_torch.save_file

    def write_shard_then_die(*args, **kwargs):
        write_shard(*args, **kwargs)
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(safetensors_torch, "save_file", write_shard_then_die)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(TopKSAE(D, M + 9, 4, seed=2), tmp_path)
    with pytest.raises(FileNotFoundError, match="index.json"):
        load_checkpoint(tmp_path)


def test_the_distributed_modules_import_each_other_one_way():
    """No import cycle among interpkernels.distributed's modules (checkpoint.py imported
    sharded.py, whose save() imported checkpoint.py back, lazily): every import statement counts."""
    package = Path(launch.__file__).parent
    imports = {}
    for path in package.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        imports[f"interpkernels.distributed.{path.stem}"] = {
            name for name in names if name.startswith("interpkernels.distributed.")}
    assert imports["interpkernels.distributed.checkpoint"] >= {"interpkernels.distributed.sharded"}
    list(graphlib.TopologicalSorter(imports).static_order())  # CycleError names the cycle
