"""interpkernels.integrations.dictionary_learning against the installed dictionary-learning."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip(
    "dictionary_learning", reason="dictionary-learning is not installed (setup_helpers/peer-requirements.txt)"
)

from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer  # noqa: E402

# dictionary_learning/__init__ imports nnsight, which (0.3.x) monkeypatches torch
# at import: FakeTensor.__new__ (dropping its `pytype` argument), __bool__ and
# tolist, autocast.__init__, F.one_hot, einops and math. That breaks fake-tensor
# tracing (torch.library.opcheck, torch.compile) for every later test in the
# session. Nothing tested here uses nnsight: undo its patches (its own API).
nnsight = sys.modules.get("nnsight")
if nnsight is not None and hasattr(nnsight, "DEFAULT_PATCHER"):
    nnsight.DEFAULT_PATCHER.__exit__(None, None, None)
from integration_helpers import assert_close, assert_grads_close, count_op_calls, dense_code, randomize_  # noqa: E402
from interpkernels.integrations import dictionary_learning as ik  # noqa: E402

D, M, K = 32, 128, 8

# The library's own TopKTrainer.update, on a deep copy, triggers this harmless one.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden:UserWarning")


@pytest.fixture(autouse=True)
def _no_class_patches():
    ik.revert_dictionary_learning()
    yield
    ik.revert_dictionary_learning()


@pytest.fixture
def op_calls(monkeypatch):
    return count_op_calls(monkeypatch)


def ae_pair():
    reference = randomize_(AutoEncoderTopK(D, M, K))
    return reference, ik.accelerate(copy.deepcopy(reference))


def make_trainer() -> TopKTrainer:
    trainer = TopKTrainer(
        steps=10, activation_dim=D, dict_size=M, k=K, layer=0, lm_name="test", device="cpu", warmup_steps=2, seed=0
    )
    randomize_(trainer.ae, std=0.2)
    trainer.dead_feature_threshold = 100
    return trainer


def trainer_pair():
    reference = make_trainer()
    return reference, ik.accelerate(copy.deepcopy(reference))


def make_latents_dead(*trainers):
    for trainer in trainers:
        trainer.num_tokens_since_fired[1::3] = 1000


@pytest.mark.parametrize("shape", [(40,), (3, 7)], ids=["2d", "3d"])
def test_autoencoder_encode_decode_forward(shape, op_calls):
    reference, patched = ae_pair()
    x = torch.randn(*shape, D)

    f = patched.encode(x)
    expected_f = reference.encode(x)
    assert f.shape == (*shape, M)
    assert_close(f, expected_f, what="encode")
    x_hat = patched.decode(f)  # decodes from the code
    assert_close(x_hat, reference.decode(expected_f), what="decode")
    assert len(op_calls["topk_encode"]) == 1 and len(op_calls["sparse_decode"]) == 1

    out, features = patched(x, output_features=True)
    expected_out, expected_features = reference(x, output_features=True)
    assert_close(out, expected_out, what="forward")
    assert_close(features, expected_features, what="features")
    assert_close(patched(x), reference(x), what="forward")

    (out.square().sum() + x_hat.sum()).backward()
    (expected_out.square().sum() + reference.decode(expected_f).sum()).backward()
    assert_grads_close(patched, reference)


def test_return_topk_and_layouts(op_calls):
    reference, patched = ae_pair()
    params_before = {name: (p, p.data_ptr(), p.shape) for name, p in patched.named_parameters()}
    state_keys = list(reference.state_dict())
    x = torch.randn(24, D)

    f, top_acts, top_indices, post_relu = patched.encode(x, return_topk=True)
    e_f, e_acts, e_indices, e_post_relu = reference.encode(x, return_topk=True)
    assert post_relu is None
    assert top_acts.shape == (24, K) and top_indices.dtype == torch.int64
    assert_close(f, e_f)
    assert_close(dense_code(top_acts, top_indices, M), dense_code(e_acts, e_indices, M))
    patched.decode(f)

    (_, W_enc_arg, b_enc_arg, k_arg), _ = op_calls["topk_encode"][0]
    assert W_enc_arg is patched.encoder.weight and b_enc_arg is patched.encoder.bias and k_arg == K
    (_, _, W_dec_arg, *_), _ = op_calls["sparse_decode"][0]
    assert W_dec_arg._base is patched.decoder.weight and W_dec_arg.shape == (M, D)  # decoder.weight.T: a view
    assert {name: (p, p.data_ptr(), p.shape) for name, p in patched.named_parameters()} == params_before
    assert patched.decoder.weight.shape == (D, M) and patched.encoder.weight.shape == (M, D)
    assert list(patched.state_dict()) == state_keys

    ik.accelerate(patched, materialize_pre_acts=True)
    assert_close(patched.encode(x, return_topk=True)[3], e_post_relu, what="post_relu_acts_BF")

    # use_threshold keeps the library's code (a dense JumpReLU-like encode).
    patched.threshold.fill_(0.5)
    reference.threshold.fill_(0.5)
    calls = len(op_calls["topk_encode"])
    assert_close(patched.encode(x, use_threshold=True), reference.encode(x, use_threshold=True))
    assert len(op_calls["topk_encode"]) == calls


@pytest.mark.parametrize("with_dead", [True, False], ids=["auxk", "no-auxk"])
@pytest.mark.parametrize("logging", [False, True])
def test_trainer_loss_matches_library(with_dead, logging, op_calls):
    reference, patched = trainer_pair()
    if with_dead:
        make_latents_dead(reference, patched)
    x = torch.randn(12, D)  # few tokens: many latents stay unfired, hence dead

    expected = reference.loss(x, step=0, logging=logging)
    actual = patched.loss(x, step=0, logging=logging)
    if logging:
        for field in ("x_hat", "f"):
            assert_close(getattr(actual, field), getattr(expected, field), what=field)
        for name, value in expected.losses.items():
            assert actual.losses[name] == pytest.approx(value, rel=1e-5), name
    else:
        assert_close(actual, expected, what="loss")
        expected.backward()
        actual.backward()
        assert_grads_close(patched.ae, reference.ae)  # AuxK reaches the encoder in both

    assert torch.equal(patched.num_tokens_since_fired, reference.num_tokens_since_fired)
    assert patched.dead_features == reference.dead_features
    assert (patched.dead_features > 0) == with_dead
    if with_dead:
        assert patched.pre_norm_auxk_loss.item() == pytest.approx(reference.pre_norm_auxk_loss.item(), rel=1e-5)
    assert len(op_calls["topk_encode"]) == 1 + with_dead
    assert len(op_calls["sparse_decode"]) == 1 + with_dead


def test_trainer_update_steps_match_library():
    reference, patched = trainer_pair()
    make_latents_dead(reference, patched)
    for step in range(3):
        x = torch.randn(16, D)
        assert patched.update(step, x) == pytest.approx(reference.update(step, x), rel=1e-5)
    for (name, p), q in zip(reference.ae.named_parameters(), patched.ae.parameters(), strict=True):
        assert_close(q.detach(), p.detach(), rtol=1e-5, what=name)


def test_apply_and_revert(op_calls):
    original = TopKTrainer.loss
    ik.apply_to_dictionary_learning()
    x = torch.randn(8, D)
    AutoEncoderTopK(D, M, K)(x)
    trainer = make_trainer()
    trainer.loss(x, step=0)
    assert len(op_calls["topk_encode"]) == 2

    ik.revert(trainer)  # the trainer and its autoencoder
    trainer.loss(x, step=0)
    assert len(op_calls["topk_encode"]) == 2
    ik.revert_dictionary_learning()
    assert TopKTrainer.loss is original
