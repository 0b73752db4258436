"""interpkernels.integrations.sparsify against the installed eai-sparsify."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

# sparsify picks its Triton decoder whenever triton imports (the dev venv has
# triton); without a GPU its launch fails ("0 active drivers"). The unpatched
# reference then uses sparsify's eager decoder (F.embedding_bag). Must be set
# before sparsify is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

pytest.importorskip(
    "sparsify.sparse_coder", reason="eai-sparsify is not installed (setup_helpers/peer-requirements.txt)"
)

import sparsify  # noqa: E402
from integration_helpers import assert_close, assert_grads_close, count_op_calls, dense_code, randomize_  # noqa: E402
from interpkernels.integrations import sparsify as ik  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from sparsify.fused_encoder import EncoderOutput  # noqa: E402
from sparsify.sparse_coder import ForwardOutput  # noqa: E402

D, M, K = 32, 128, 8


@pytest.fixture(autouse=True)
def _no_class_patches():
    ik.revert_sparsify()
    yield
    ik.revert_sparsify()


@pytest.fixture
def op_calls(monkeypatch):
    return count_op_calls(monkeypatch)


def make_sae(**cfg) -> SparseCoder:
    cfg = {"num_latents": M, "k": K, **cfg}
    return randomize_(SparseCoder(D, SparseCoderConfig(**cfg)))


def dead_mask(every: int = 3) -> torch.Tensor:
    mask = torch.zeros(M, dtype=torch.bool)
    mask[1::every] = True
    return mask


def pair(**cfg):
    """(unpatched reference, patched copy) with identical parameters."""
    reference = make_sae(**cfg)
    return reference, ik.accelerate(copy.deepcopy(reference))


def dense_oracle(sae: SparseCoder, x, dead=None):
    """sparsify's forward written densely with plain autograd, so every loss
    reaches every parameter it depends on (no dropped pre_acts gradient)."""
    cfg = sae.cfg
    x_in = x if cfg.transcode else x - sae.b_dec
    pre = F.relu(F.linear(x_in, sae.encoder.weight, sae.encoder.bias))

    def decode(acts, indices):
        return dense_code(acts, indices, M) @ sae.W_dec

    acts, indices = pre.topk(cfg.k, sorted=False)
    sae_out = decode(acts, indices) + sae.b_dec
    e = x - sae_out
    total_variance = (x - x.mean(0)).pow(2).sum()
    fvu = e.pow(2).sum() / total_variance
    auxk = x.new_tensor(0.0)
    if dead is not None:
        num_dead = int(dead.sum())
        k_aux = min(x.shape[-1] // 2, num_dead)
        scale = min(num_dead / (x.shape[-1] // 2), 1.0)
        aux_acts, aux_indices = torch.where(dead, pre, -torch.inf).topk(k_aux, sorted=False)
        auxk = scale * (decode(aux_acts, aux_indices) - e.detach()).pow(2).sum() / total_variance
    multi = x.new_tensor(0.0)
    if cfg.multi_topk:
        m_acts, m_indices = pre.topk(4 * cfg.k, sorted=False)
        multi = (decode(m_acts, m_indices) + sae.b_dec - x).pow(2).sum() / total_variance
    return fvu, auxk, multi


@pytest.mark.parametrize("multi_topk", [False, True])
@pytest.mark.parametrize("with_dead", [False, True])
def test_forward_outputs_and_fvu_gradients_match_library(multi_topk, with_dead, op_calls):
    reference, patched = pair(multi_topk=multi_topk)
    x = torch.randn(64, D)
    dead = dead_mask() if with_dead else None

    expected = reference(x, dead_mask=dead)
    actual = patched(x, dead_mask=dead)

    assert type(actual) is ForwardOutput
    for field in ("sae_out", "fvu", "auxk_loss", "multi_topk_fvu"):
        assert_close(getattr(actual, field), getattr(expected, field), what=field)
    if with_dead:
        assert expected.auxk_loss > 0
    assert_close(
        dense_code(actual.latent_acts, actual.latent_indices, M),
        dense_code(expected.latent_acts, expected.latent_indices, M),
        what="code",
    )
    # fvu's gradients are untouched by the AuxK / Multi-TopK fix: all must match.
    expected.fvu.backward()
    actual.fvu.backward()
    assert_grads_close(patched, reference)

    assert len(op_calls["topk_encode"]) == 1 + with_dead
    assert len(op_calls["sparse_decode"]) == 1 + with_dead + multi_topk


def test_auxk_and_multi_topk_gradients_now_reach_the_encoder():
    reference, patched = pair(multi_topk=True)
    oracle = copy.deepcopy(reference)
    x = torch.randn(64, D)
    dead = dead_mask()
    encoder_side = ("encoder.weight", "encoder.bias", "b_dec")

    # The library: AuxK trains W_dec only; its encoder gradient is exactly zero.
    reference(x, dead_mask=dead).auxk_loss.backward()
    for name, param in reference.named_parameters():
        if name in ("encoder.weight", "encoder.bias", "b_dec"):
            assert param.grad is None or param.grad.abs().max() == 0, name

    patched(x, dead_mask=dead).auxk_loss.backward()
    for name in encoder_side:
        assert patched.get_parameter(name).grad.abs().max() > 0, name
    assert_close(patched.W_dec.grad, reference.W_dec.grad, what="AuxK grad W_dec (unchanged)")

    # And the new gradients are the right ones: those of a dense autograd oracle.
    _, auxk, _ = dense_oracle(oracle, x, dead)
    auxk.backward()
    assert_grads_close(patched, oracle)

    # Multi-TopK too (the whole loss, every parameter).
    for module in (patched, oracle):
        module.zero_grad(set_to_none=True)
    out = patched(x, dead_mask=dead)
    (out.fvu + out.auxk_loss + out.multi_topk_fvu).backward()
    fvu, auxk, multi = dense_oracle(oracle, x, dead)
    (fvu + auxk + multi).backward()
    assert_grads_close(patched, oracle)


def test_3d_inputs(op_calls):
    reference, patched = pair()
    x = torch.randn(4, 16, D)
    dead = dead_mask()
    flat = x.reshape(-1, D)
    total_variance = (flat - flat.mean(0)).pow(2).sum()

    # The library cannot take [B, S, d] (its decoder is a 2-D embedding_bag):
    # compare with the library on the flattened batch.
    expected = reference(flat, dead_mask=dead, total_variance=total_variance)
    actual = patched(x, dead_mask=dead, total_variance=total_variance)
    assert actual.sae_out.shape == x.shape and actual.latent_acts.shape == (4, 16, K)
    assert_close(actual.sae_out.reshape(-1, D), expected.sae_out, what="sae_out")
    assert_close(actual.fvu, expected.fvu, what="fvu")
    assert_close(actual.auxk_loss, expected.auxk_loss, what="auxk_loss")
    expected.fvu.backward()
    actual.fvu.backward()
    assert_grads_close(patched, reference)

    code = patched.encode(x)
    assert code.top_acts.shape == (4, 16, K) and code.top_indices.shape == (4, 16, K)
    assert_close(patched.decode(code.top_acts, code.top_indices), actual.sae_out, what="decode")


def test_encode_decode_api_and_layouts_unchanged(op_calls):
    reference, patched = pair()
    params_before = {name: (param, param.data_ptr(), param.shape) for name, param in patched.named_parameters()}
    state_keys = list(reference.state_dict())
    x = torch.randn(32, D)

    code = patched.encode(x)
    expected = reference.encode(x)
    assert type(code) is EncoderOutput and code.pre_acts is None
    assert code.top_indices.dtype == torch.int64
    assert_close(dense_code(code.top_acts, code.top_indices, M), dense_code(expected.top_acts, expected.top_indices, M))
    assert_close(
        patched.decode(code.top_acts, code.top_indices), reference.decode(expected.top_acts, expected.top_indices)
    )

    # The ops get the library's own Parameters: encoder [M, d], W_dec [M, d].
    (x_arg, W_enc_arg, b_enc_arg, k_arg), _ = op_calls["topk_encode"][0]
    assert W_enc_arg is patched.encoder.weight and b_enc_arg is patched.encoder.bias and k_arg == K
    (_, _, W_dec_arg, bias_arg), _ = op_calls["sparse_decode"][0]
    assert W_dec_arg is patched.W_dec and bias_arg is patched.b_dec

    assert {name: (p, p.data_ptr(), p.shape) for name, p in patched.named_parameters()} == params_before
    assert patched.encoder.weight.shape == (M, D) and patched.W_dec.shape == (M, D)
    assert list(patched.state_dict()) == state_keys

    # materialize_pre_acts brings the dense pre_acts back, with gradients.
    ik.accelerate(patched, materialize_pre_acts=True)
    code = patched.encode(x)
    assert_close(code.pre_acts, expected.pre_acts, what="pre_acts")
    code.pre_acts.sum().backward()
    assert patched.encoder.weight.grad.abs().max() > 0


@pytest.mark.parametrize("cfg", [{"transcode": True}, {"skip_connection": True}])
def test_transcoder_and_skip_connection(cfg):
    reference, patched = pair(**cfg)
    x, y = torch.randn(48, D), torch.randn(48, D)
    expected, actual = reference(x, y), patched(x, y)
    assert_close(actual.sae_out, expected.sae_out, what="sae_out")
    assert_close(actual.fvu, expected.fvu, what="fvu")
    expected.fvu.backward()
    actual.fvu.backward()
    assert_grads_close(patched, reference)


def test_groupmax_encodes_with_the_library(op_calls):
    # The fused encoder is top-k only: groupmax keeps sparsify's encoder; the
    # decode of its code still runs on sparse_decode.
    reference, patched = pair(activation="groupmax")
    x = torch.randn(16, D)
    expected, actual = reference(x), patched(x)
    assert_close(actual.sae_out, expected.sae_out)
    expected.fvu.backward()
    actual.fvu.backward()
    assert_grads_close(patched, reference)
    assert not op_calls["topk_encode"] and len(op_calls["sparse_decode"]) == 1


def test_apply_revert_and_copies(op_calls):
    original_forward = SparseCoder.forward
    ik.apply_to_sparsify()
    sae = make_sae()
    x = torch.randn(8, D)
    sae(x)
    assert len(op_calls["topk_encode"]) == 1
    sparsify.Sae(D, SparseCoderConfig(num_latents=M, k=K))(x)  # the alias is the same class
    assert len(op_calls["topk_encode"]) == 2

    clone = copy.deepcopy(ik.accelerate(make_sae()))  # the instance options travel with copies
    clone(x)
    assert len(op_calls["topk_encode"]) == 3

    ik.revert(sae)  # this instance only
    sae(x)
    assert len(op_calls["topk_encode"]) == 3

    ik.revert_sparsify()
    assert SparseCoder.forward is original_forward
    make_sae()(x)
    clone(x)
    assert len(op_calls["topk_encode"]) == 3
