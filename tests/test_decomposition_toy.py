"""Parameter decomposition on the toy model of superposition (5 features, 2-d
bottleneck): the worked run of docs/decomposition.md, with fixed seeds. The target is trained
from its own generator (seed 0; the recovery test also seed 2); the components, gates
and data come from another (seed 1). The recovery criterion itself is tested on
components built by hand."""

import dataclasses

import pytest
import torch
from torch import nn

from interpkernels.decomposition import (
    CausalImportance,
    LinearComponents,
    SPDConfig,
    TransposedLinearComponents,
    importance_minimality,
    mask_importance,
    minimality_importance,
    toy,
    train_spd,
)
from interpkernels.decomposition.train import APDConfig, TrainingLog, train_apd

@pytest.fixture(scope="module")
def target():
    torch.set_num_threads(1)
    return toy.train_target(steps=1000)


def test_target_is_in_superposition(target):
    """All 5 features represented (norm ~1) in 2 dimensions: the pentagon."""
    norms = target.hidden.weight.norm(dim=0)
    assert bool((norms > 0.9).all()), norms


def pentagon() -> toy.ToyModelOfSuperposition:
    """A target by hand: the 5 features on a regular pentagon, the superposition TMS learns."""
    angles = torch.arange(5) * 2 * torch.pi / 5
    return toy.ToyModelOfSuperposition(torch.stack([angles.cos(), angles.sin()]), torch.full((5,), -0.2))


def hand_built_components(model, pieces):
    """Tied components set by hand: component c is pieces[c] = (scale, feature i) of mechanism i,
    scale x (W[:, i] e_i^T in hidden, e_i W[:, i]^T in readout)."""
    hidden = LinearComponents(model.hidden, len(pieces))
    with torch.no_grad():
        hidden.V.zero_()
        for c, (scale, feature) in enumerate(pieces):
            hidden.V[feature, c] = 1
            hidden.U[c] = scale * model.hidden.weight[:, feature]
    return {"hidden": hidden, "readout": TransposedLinearComponents(model.readout, hidden)}


WHOLE = [(1.0, feature) for feature in range(5)]


@pytest.mark.parametrize("pieces, verdict", [
    (WHOLE, "recovered"),
    # A crumb along the mechanism but of no real norm (5%) does not split it.
    ([(1.0, 0), (0.95, 1), (0.05, 1), (1.0, 2), (1.0, 3), (1.0, 4)], "recovered"),
    # Issue 15: feature 1 carried 0.46 / 0.54 by two parallel components. Every feature still
    # has a distinct best component at cosine 1, which the old criterion called recovered.
    ([(1.0, 0), (0.46, 1), (0.54, 1), (1.0, 2), (1.0, 3), (1.0, 4)], "not recovered (split 1; unowned 1)"),
    # An owner carrying 92% beside a second component carrying 15% (a third takes 7% back):
    # split, though the owner alone would pass.
    ([(1.0, 0), (0.92, 1), (0.15, 1), (-0.07, 1), (1.0, 2), (1.0, 3), (1.0, 4)], "not recovered (split 1)"),
    # An owner 30% too long, cancelled by a reversed piece: adds up to the target, recovers nothing.
    ([(1.3, 0), (-0.3, 0)] + WHOLE[1:], "not recovered (split 0; unowned 0)"),
])
def test_recovery_needs_each_mechanism_whole_in_one_component_and_no_other(pieces, verdict):
    model = pentagon()
    layers = hand_built_components(model, pieces)
    # The pieces add up to the target in every case: faithfulness cannot tell them apart.
    for layer in layers.values():
        torch.testing.assert_close(layer.weight(), layer.target_weight)
    found = toy.recovery(model, layers)
    assert found.recovered == (verdict == "recovered"), found
    assert found.verdict == verdict, found
    assert min(found.cosine) > 0.999  # every owner points exactly along its mechanism
    for feature in range(5):
        owned = [scale for scale, f in pieces if f == feature]
        shares = sorted(owned, key=abs, reverse=True) + [0.0]  # the runner-up of a whole copy carries 0
        assert found.share[feature] == pytest.approx(max(owned), abs=1e-6)
        assert found.runner_up_share[feature] == pytest.approx(shares[1], abs=1e-6)


def test_transposed_components_are_the_sources_transposed_and_share_its_parameters():
    generator = torch.Generator().manual_seed(3)
    first, second = nn.Linear(7, 3, bias=False), nn.Linear(3, 7)
    for rank in (1, 2):
        source = LinearComponents(first, 4, rank, generator=generator)
        tied = TransposedLinearComponents(second, source)
        assert list(tied.parameters()) == []  # trained once, through source
        torch.testing.assert_close(tied.component_weights(), source.component_weights().transpose(1, 2))
        torch.testing.assert_close(tied.weight(), source.weight().T)
        x = torch.randn(5, 3, generator=generator)
        tied(x).square().sum().backward()
        assert source.V.grad is not None and source.V.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="target"):
        TransposedLinearComponents(nn.Linear(3, 6), source)
    with pytest.raises(TypeError, match="source"):
        TransposedLinearComponents(second, first)


def test_causal_importance_gates_and_minimality():
    gate = CausalImportance(6, 4, generator=torch.Generator().manual_seed(2))
    h = torch.randn(10, 6, generator=torch.Generator().manual_seed(5))
    z = gate(h)
    assert z.shape == (10, 6)
    # Column c depends on h[:, c] only: the gate of a component sees that component alone.
    h2 = h.clone()
    h2[:, 0] += 1
    assert torch.equal(gate(h2)[:, 1:], z[:, 1:]) and not torch.equal(gate(h2)[:, 0], z[:, 0])
    values = torch.tensor([-2.0, 0.25, 3.0])
    torch.testing.assert_close(mask_importance(values), torch.tensor([-0.02, 0.25, 1.0]))
    torch.testing.assert_close(minimality_importance(values), torch.tensor([0.0, 0.25, 1.02]))
    g = torch.tensor([[0.5, 0.0], [1.0, 0.25]])
    torch.testing.assert_close(importance_minimality([g, g], p=1.0), torch.tensor(2 * (0.5 + 1.25) / 2))
    with pytest.raises(ValueError, match="h"):
        gate(torch.randn(10, 5))
    with pytest.raises(ValueError, match="importances"):
        importance_minimality([])


def test_spd_rejects_mismatched_gates_and_rank_m_components(target):
    generator = torch.Generator().manual_seed(4)
    layers = {"hidden": LinearComponents(target.hidden, 3, generator=generator)}
    with pytest.raises(ValueError, match="gates"):
        train_spd(target, layers, {}, lambda: torch.rand(4, 5), SPDConfig(steps=1))
    rank_two = {"hidden": LinearComponents(target.hidden, 3, 2, generator=generator)}
    with pytest.raises(ValueError, match="rank"):
        train_spd(target, rank_two, {"hidden": CausalImportance(3)}, lambda: torch.rand(4, 5), SPDConfig(steps=1))


def test_apd_training_loop_logs_plain_lines_and_fits_the_weights(target, capsys):
    config = APDConfig(steps=60, k=0.25, log_every=30)
    layers, before, after = toy.decompose(target, 5, config=config, batch=256)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["30/60", "60/60"]
    assert all(" elapsed " in line and " left " in line for line in lines)  # the shared plain-line tail
    faithfulness = [float(line.split("faithfulness ")[1].split()[0]) for line in lines]
    assert faithfulness[1] < faithfulness[0]  # the components start adding up to the target
    assert len(before.cosine) == len(after.cosine) == 5


def test_apd_and_spd_training_stop_on_a_nonfinite_loss(target):
    generator = torch.Generator().manual_seed(5)
    steps = iter(range(1, 100))

    def batches():
        x = torch.rand(16, 5, generator=generator)
        if next(steps) == 3:
            x[2, 1] = float("nan")
        return x

    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or inf\) at step 3;"):
        train_apd(target, {"hidden": LinearComponents(target.hidden, 3, generator=generator)}, batches,
                  APDConfig(steps=8, k=1, log_every=4), progress=False)
    steps = iter(range(1, 100))
    with pytest.raises(FloatingPointError, match=r"non-finite \(NaN or inf\) at step 3;"):
        train_spd(target, {"hidden": LinearComponents(target.hidden, 3, generator=generator)},
                  {"hidden": CausalImportance(3)}, batches, SPDConfig(steps=8, log_every=4), progress=False)


def test_training_log_on_a_terminal_is_a_tqdm_bar_ending_in_the_last_terms(fake_terminal):
    terminal = fake_terminal()
    log = TrainingLog(4, 2)
    logged = [log.update(step, {"faithfulness": torch.tensor(step / 10)}) for step in range(1, 5)]
    log.close()
    assert logged == [False, True, False, True]
    final = terminal.getvalue().split("\r")[-1]
    assert "4/4" in final and "100%|" in final and "faithfulness 0.4" in final
    assert "step 4/4" not in terminal.getvalue()  # no plain lines beside the bar


def test_spd_training_loop_logs_plain_lines_and_moves_toward_the_mechanisms(target, capsys):
    """The default run's loop, 400 steps of 256 tokens (~3 s)."""
    config = dataclasses.replace(toy.TOY_CONFIG, steps=400, learning_rate=2e-2, log_every=200)
    layers, before, after = toy.decompose(target, config=config, batch=256)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["200/400", "400/400"]
    faithfulness = [float(line.split("faithfulness ")[1].split()[0]) for line in lines]
    assert faithfulness[-1] < faithfulness[0]
    assert after.mean_cosine > before.mean_cosine + 0.1, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("target_seed", [0, 2])
def test_spd_recovers_the_true_mechanisms(target_seed):
    """The guide's run (TOY_CONFIG, 5000 steps of 512 tokens, ~40 s per target on the shared
    2-core machine) on two targets: from random components that recover nothing to every true
    mechanism carried whole by a component of its own and by no other (Recovery.recovered), the
    components adding up to the target. Target 2 with 2500 steps ended with feature 1 split
    0.54 / 0.45 between two parallel components (issue 15), which the cosine-only criterion
    called recovered; target 0 at the old 4000 steps of 1024 ended with 11-12% of features 0 and 4
    in a second component each (one reversed)."""
    torch.set_num_threads(1)
    target = toy.train_target(seed=target_seed)
    layers, before, after = toy.decompose(target, progress=False)
    assert not before.recovered, before
    assert after.recovered, after
    assert max(layer.weight_delta().abs().max().item() for layer in layers.values()) < 0.05
