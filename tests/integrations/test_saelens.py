"""interpkernels.integrations.saelens against the installed sae-lens."""

from __future__ import annotations

import copy

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (setup_helpers/peer-requirements.txt)")

from integration_helpers import assert_close, assert_grads_close, count_op_calls, randomize_  # noqa: E402
from interpkernels.integrations import saelens as ik  # noqa: E402
from sae_lens import (  # noqa: E402
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TopKTrainingSAE,
    TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput  # noqa: E402

D, M, K = 32, 128, 8

pytestmark = [
    pytest.mark.filterwarnings("ignore:Setting use_error_term directly:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
]


@pytest.fixture(autouse=True)
def _no_class_patches():
    ik.revert_saelens()
    yield
    ik.revert_saelens()


@pytest.fixture
def op_calls(monkeypatch):
    return count_op_calls(monkeypatch)


def training_pair(**cfg):
    cfg = {"d_in": D, "d_sae": M, "k": K, **cfg}
    reference = randomize_(TopKTrainingSAE(TopKTrainingSAEConfig(**cfg)))
    return reference, ik.accelerate(copy.deepcopy(reference))


def inference_pair(**cfg):
    cfg = {"d_in": D, "d_sae": M, "k": K, **cfg}
    reference = randomize_(TopKSAE(TopKSAEConfig(**cfg)))
    return reference, ik.accelerate(copy.deepcopy(reference))


def step_input(x, dead=None) -> TrainStepInput:
    return TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False)


def dead_mask() -> torch.Tensor:
    mask = torch.zeros(M, dtype=torch.bool)
    mask[1::3] = True
    return mask


@pytest.mark.parametrize("shape", [(64,), (4, 16)], ids=["2d", "3d"])
@pytest.mark.parametrize("rescale", [True, False], ids=["rescale", "no-rescale"])
@pytest.mark.parametrize("with_dead", [True, False], ids=["auxk", "no-auxk"])
def test_training_forward_pass_matches_library(shape, rescale, with_dead, op_calls):
    reference, patched = training_pair(rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(*shape, D)
    dead = dead_mask() if with_dead else None

    expected = reference.training_forward_pass(step_input(x, dead))
    actual = patched.training_forward_pass(step_input(x, dead))

    assert type(actual) is TrainStepOutput
    assert actual.hidden_pre is None
    for field in ("sae_out", "feature_acts", "loss"):
        assert_close(getattr(actual, field), getattr(expected, field), what=field)
    assert actual.losses.keys() == expected.losses.keys()
    for name in expected.losses:
        assert_close(actual.losses[name], expected.losses[name], what=name)
    if with_dead:
        assert expected.losses["auxiliary_reconstruction_loss"] > 0

    expected.loss.backward()
    actual.loss.backward()
    assert_grads_close(patched, reference)  # AuxK reaches the encoder in both

    assert len(op_calls["topk_encode"]) == 1 + with_dead
    assert len(op_calls["sparse_decode"]) == 1 + with_dead


def test_auxk_uses_raw_pre_activations():
    # SAELens' AuxK takes the top-k_aux dead pre-activations without a ReLU:
    # with every latent dead and a strongly negative encoder bias, all of them
    # are negative and still reconstruct. The patched path must agree.
    reference, patched = training_pair(rescale_acts_by_decoder_norm=False)
    with torch.no_grad():
        for sae in (reference, patched):
            sae.b_enc.fill_(-20.0)
    x = torch.randn(32, D)
    dead = torch.ones(M, dtype=torch.bool)
    expected = reference.training_forward_pass(step_input(x, dead))
    actual = patched.training_forward_pass(step_input(x, dead))
    aux = "auxiliary_reconstruction_loss"
    assert_close(actual.losses[aux], expected.losses[aux], what=aux)
    expected.losses[aux].backward()
    actual.losses[aux].backward()
    assert_grads_close(patched, reference, names={"W_enc", "b_enc", "W_dec", "b_dec"})


def test_sparse_activations_config():
    reference, patched = training_pair(use_sparse_activations=True, rescale_acts_by_decoder_norm=False)
    x = torch.randn(48, D)
    expected = reference.training_forward_pass(step_input(x, dead_mask()))
    actual = patched.training_forward_pass(step_input(x, dead_mask()))
    assert actual.feature_acts.is_sparse
    assert_close(actual.feature_acts, expected.feature_acts, what="feature_acts")
    assert_close(actual.loss, expected.loss, what="loss")
    expected.loss.backward()
    actual.loss.backward()
    assert_grads_close(patched, reference)

    # With the default rescale_acts_by_decoder_norm=True, the library's backward
    # fails on CPU (feature_acts * (1 / ||W_dec||) on a COO tensor: no
    # aten::view for SparseCPU); the patched path scales the code instead.
    _, patched = training_pair(use_sparse_activations=True, rescale_acts_by_decoder_norm=True)
    patched.training_forward_pass(step_input(x, dead_mask())).loss.backward()
    assert patched.W_enc.grad.abs().max() > 0


@pytest.mark.parametrize("shape", [(40,), (3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("rescale", [False, True], ids=["no-rescale", "rescale"])
def test_inference_sae_encode_decode_forward(shape, rescale, op_calls):
    reference, patched = inference_pair(rescale_acts_by_decoder_norm=rescale)
    x = torch.randn(*shape, D)

    acts = patched.encode(x)
    expected_acts = reference.encode(x)
    assert acts.shape == (*shape, M) and not acts.is_sparse
    assert_close(acts, expected_acts, what="encode")
    assert len(op_calls["topk_encode"]) == 1

    recon = patched.decode(acts)  # the encoded tensor decodes sparsely
    assert len(op_calls["sparse_decode"]) == 1
    assert_close(recon, reference.decode(expected_acts), what="decode")

    out = patched(x)
    expected_out = reference(x)
    assert_close(out, expected_out, what="forward")
    assert len(op_calls["topk_encode"]) == 2 and len(op_calls["sparse_decode"]) == 2

    (out.square().sum() + recon.sum()).backward()
    (expected_out.square().sum() + reference.decode(expected_acts).sum()).backward()
    assert_grads_close(patched, reference)


def test_decode_of_other_dense_tensors_uses_the_library(op_calls):
    reference, patched = inference_pair()
    x = torch.randn(16, D)
    acts = patched.encode(x)
    assert len(op_calls["sparse_decode"]) == 0

    edited = acts.clone()
    edited[:, 0] = 1.0  # a different tensor: dense matmul, as the library
    assert_close(patched.decode(edited), reference.decode(edited))

    acts[:, 1] += 2.0  # edited in place: its code no longer applies
    assert_close(patched.decode(acts), reference.decode(acts))

    with torch.no_grad():
        frozen = patched.encode(x)
    frozen.requires_grad_()  # a leaf made for attribution: its gradient must arrive
    patched.decode(frozen).sum().backward()
    assert frozen.grad is not None and frozen.grad.abs().max() > 0
    assert len(op_calls["sparse_decode"]) == 0


def test_hooks(op_calls):
    reference, patched = inference_pair()
    x = torch.randn(12, D)

    def double(acts, hook):
        return acts * 2

    for sae in (reference, patched):
        sae.add_hook("hook_sae_acts_post", double)
    assert_close(patched(x), reference(x), what="hooked acts_post")
    assert len(op_calls["topk_encode"]) == 1  # still fused; the hook's output decoded densely

    for sae in (reference, patched):
        sae.reset_hooks()
    seen = []
    for sae in (reference, patched):
        sae.add_hook("hook_sae_acts_pre", lambda pre, hook: seen.append(pre.shape) or pre)
    assert_close(patched(x), reference(x), what="hooked acts_pre")
    assert seen == [(12, M), (12, M)]  # the library's path: the hook saw hidden_pre
    assert len(op_calls["topk_encode"]) == 1
    for sae in (reference, patched):
        sae.reset_hooks()

    # use_error_term: the output is the input again (as the library's).
    patched.use_error_term = reference.use_error_term = True
    assert_close(patched(x), reference(x), what="use_error_term")


def test_layouts_identities_and_materialized_hidden_pre(op_calls):
    reference, patched = training_pair(rescale_acts_by_decoder_norm=False)
    params_before = {name: (p, p.data_ptr(), p.shape) for name, p in patched.named_parameters()}
    state_keys = list(reference.state_dict())
    x = torch.randn(24, D)
    patched.training_forward_pass(step_input(x))

    (_, W_enc_arg, b_enc_arg, _), _ = op_calls["topk_encode"][0]
    assert W_enc_arg._base is patched.W_enc and W_enc_arg.shape == (M, D)  # W_enc.T: a view
    assert b_enc_arg is patched.b_enc
    (_, _, W_dec_arg, *_), _ = op_calls["sparse_decode"][0]
    assert W_dec_arg is patched.W_dec
    assert {name: (p, p.data_ptr(), p.shape) for name, p in patched.named_parameters()} == params_before
    assert patched.W_enc.shape == (D, M) and patched.W_dec.shape == (M, D)
    assert list(patched.state_dict()) == state_keys

    ik.accelerate(patched, materialize_pre_acts=True)
    acts, hidden_pre = patched.encode_with_hidden_pre(x)
    expected_acts, expected_pre = reference.encode_with_hidden_pre(x)
    assert_close(acts, expected_acts)
    assert_close(hidden_pre, expected_pre)
    out = patched.training_forward_pass(step_input(x))
    assert_close(out.hidden_pre, expected_pre)


def test_apply_revert_and_unsupported_subclasses(op_calls):
    original = TopKTrainingSAE.training_forward_pass
    ik.apply_to_saelens()
    x = torch.randn(8, D)
    sae = randomize_(TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    sae.training_forward_pass(step_input(x))
    TopKSAE(TopKSAEConfig(d_in=D, d_sae=M, k=K))(x)
    assert len(op_calls["topk_encode"]) == 2

    # BatchTopK subclasses TopKTrainingSAE but has another activation: library code.
    batch = randomize_(BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D, d_sae=M, k=K)))
    reference = copy.deepcopy(batch)
    ik.revert(reference)
    assert_close(batch.training_forward_pass(step_input(x)).loss, reference.training_forward_pass(step_input(x)).loss)
    assert len(op_calls["topk_encode"]) == 2

    ik.revert(sae)
    sae.training_forward_pass(step_input(x))
    assert len(op_calls["topk_encode"]) == 2
    ik.revert_saelens()
    assert TopKTrainingSAE.training_forward_pass is original
