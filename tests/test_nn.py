"""interpkernels.nn modules: outputs against dense math, AuxK, save/load."""

import pytest
import torch

from interpkernels import nn as ik_nn
from interpkernels import reference

SAE_CLASSES = [ik_nn.TopKSAE, ik_nn.BatchTopKSAE, ik_nn.JumpReLUSAE]


def randomize_(module):
    """Non-zero biases and thresholds so every term is exercised."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("b_"):
                p.copy_(0.1 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("cls", SAE_CLASSES, ids=lambda c: c.__name__)
def test_sae_forward_matches_dense_math_and_backend_torch(cls):
    torch.manual_seed(0)
    module = randomize_(cls(12, 48, 4, seed=1)).double()
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    out = module(x)
    dense = reference.densify(out.values, out.indices, 48)
    torch.testing.assert_close(out.reconstruction, dense @ module.W_dec + module.b_dec)
    torch.testing.assert_close(out.fvu, reference.fvu(out.reconstruction, x))
    assert out.values.shape[:-1] == (3, 7) and out.auxk_loss == 0
    module.backend = "torch"  # the dense reference ops give the same result
    torch.testing.assert_close(module(x).reconstruction, out.reconstruction)


@pytest.mark.parametrize("cls", [*SAE_CLASSES, ik_nn.Transcoder, ik_nn.JumpReLUTranscoder], ids=lambda c: c.__name__)
@pytest.mark.parametrize("leading", [(0,), (2, 0)], ids=str)
def test_forward_on_no_rows_raises_naming_x(cls, leading):
    """An FVU over no rows is 0 / 0: a ValueError, never a NaN in the loss."""
    module = cls(8, 24, 3, seed=0)
    x = torch.randn(*leading, 8)
    with pytest.raises(ValueError, match=r"x: expected at least one row .* got float32 \[.*0, 8\]"):
        module(x, torch.randn(*leading, 8))


def test_cross_layer_transcoder_on_no_rows_raises_naming_the_input():
    module = ik_nn.CrossLayerTranscoder(2, 8, 24, 3, seed=0)
    inputs = [torch.randn(4, 8), torch.randn(0, 8)]
    with pytest.raises(ValueError, match=r"inputs\[1\]: expected at least one row"):
        module(inputs, [torch.randn(4, 8), torch.randn(0, 8)])


def test_topk_sae_code_is_the_reference_encoder():
    module = randomize_(ik_nn.TopKSAE(10, 30, 3, seed=0)).double()
    x = torch.randn(20, 10, dtype=torch.float64)
    values, indices = module.encode(x)
    want_values, want_indices = reference.topk_encode(x, module.W_enc, module.b_enc, 3, pre_bias=module.b_dec)
    assert torch.equal(indices, want_indices)
    torch.testing.assert_close(values, want_values)


def test_auxk_reaches_the_encoder_through_dead_latents_only():
    torch.manual_seed(0)
    module = randomize_(ik_nn.TopKSAE(16, 64, 4, k_aux=8, seed=0))
    x = torch.randn(50, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::4] = True
    out = module(x, dead_mask=dead)
    assert out.auxk_loss > 0
    module.zero_grad()
    out.auxk_loss.backward()
    assert module.W_enc.grad[dead].abs().sum() > 0 and module.b_enc.grad[dead].abs().sum() > 0
    assert module.W_enc.grad[~dead].abs().sum() == 0
    # Fewer dead latents than k_aux: no error, no host sync needed, finite loss.
    few = torch.zeros(64, dtype=torch.bool)
    few[:3] = True
    assert torch.isfinite(module(x, dead_mask=few).auxk_loss)


def test_transcoder_with_skip_and_its_target():
    torch.manual_seed(0)
    module = randomize_(ik_nn.Transcoder(12, 40, 5, d_out=9, skip=True, seed=0)).double()
    with torch.no_grad():
        module.W_skip.copy_(torch.randn(9, 12))
    x, y = torch.randn(30, 12, dtype=torch.float64), torch.randn(30, 9, dtype=torch.float64)
    out = module(x, y)
    dense = reference.densify(out.values, out.indices, 40)
    torch.testing.assert_close(out.reconstruction, dense @ module.W_dec + module.b_dec + x @ module.W_skip.T)
    want_values, _ = reference.topk_encode(x, module.W_enc, module.b_enc, 5)  # no pre-bias for transcoders
    torch.testing.assert_close(out.values, want_values)
    with pytest.raises(ValueError, match="target"):
        module(x)


@pytest.mark.parametrize("k", [40, 3])
def test_jumprelu_transcoder_code_is_pre_times_step(k):
    """circuit-tracer's JumpReLU (transcoder/activation_functions.py):
    ``x * (x > threshold)`` on ``pre = x @ W_enc.T + b_enc`` (no pre-bias);
    with k < M the k largest of those are kept."""
    torch.manual_seed(0)
    module = randomize_(ik_nn.JumpReLUTranscoder(12, 40, k, d_out=9, skip=True, seed=0)).double()
    with torch.no_grad():
        module.threshold.uniform_(0.0, 0.5)
        module.W_skip.copy_(torch.randn(9, 12))
    x = torch.randn(30, 12, dtype=torch.float64)
    pre = x @ module.W_enc.T + module.b_enc
    want = pre * (pre > module.threshold)
    want = want * (want >= want.topk(k, dim=-1).values[:, -1:])
    values, indices = module.encode(x)
    torch.testing.assert_close(reference.densify(values, indices, 40), want)
    torch.testing.assert_close(module.reconstruct(x, values, indices),
                               want @ module.W_dec + module.b_dec + x @ module.W_skip.T)


def test_cross_layer_transcoder_decodes_each_code_to_later_layers():
    torch.manual_seed(0)
    L, d, M, k = 3, 8, 20, 3
    module = ik_nn.CrossLayerTranscoder(L, d, M, k, seed=0).double()
    with torch.no_grad():
        module.b_dec.copy_(torch.randn(L, d))
    inputs = [torch.randn(6, d, dtype=torch.float64) for _ in range(L)]
    targets = [torch.randn(6, d, dtype=torch.float64) for _ in range(L)]
    out = module(inputs, targets)
    codes = [reference.densify(v, i, M) for v, i in zip(out.values, out.indices)]
    for target in range(L):
        want = module.b_dec[target] + sum(codes[s] @ module.decoder(s)[target - s] for s in range(target + 1))
        torch.testing.assert_close(out.reconstruction[target], want)
    out.fvu.backward()
    assert all(p.grad is not None for p in module.parameters())


def test_jumprelu_cross_layer_transcoder_codes_each_layer_against_its_thresholds(tmp_path):
    torch.manual_seed(0)
    L, d, M = 3, 8, 20
    module = ik_nn.JumpReLUCrossLayerTranscoder(L, d, M, M, seed=0).double()
    with torch.no_grad():
        for layer in range(L):
            module.b_enc[layer].copy_(torch.randn(M))
            module.threshold[layer].uniform_(0.0, 1.0)
    inputs = [torch.randn(6, d, dtype=torch.float64) for _ in range(L)]
    for layer, x in enumerate(inputs):
        pre = x @ module.W_enc[layer].T + module.b_enc[layer]
        want = pre * (pre > module.threshold[layer])
        assert bool((want > 0).any()) and bool(((want == 0) & (pre > 0)).any()), "thresholds that cut nothing"
        torch.testing.assert_close(reference.densify(*module.encode_layer(layer, x), M), want)
    module = module.float()  # load() rebuilds float32 modules
    module.save(tmp_path / "clt.safetensors")
    loaded = ik_nn.SafetensorsModule.load(tmp_path / "clt.safetensors")
    assert type(loaded) is ik_nn.JumpReLUCrossLayerTranscoder and loaded.config == module.config
    assert all(torch.equal(p, loaded.state_dict()[name]) for name, p in module.state_dict().items())


def test_cross_layer_transcoder_save_and_load(tmp_path):
    module = ik_nn.CrossLayerTranscoder(3, 8, 20, 3, seed=0)
    module.save(tmp_path / "clt.safetensors")
    loaded = ik_nn.SafetensorsModule.load(tmp_path / "clt.safetensors")
    assert type(loaded) is ik_nn.CrossLayerTranscoder and loaded.config == module.config
    for (name, p), (_, q) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("cls", [*SAE_CLASSES, ik_nn.Transcoder, ik_nn.JumpReLUTranscoder], ids=lambda c: c.__name__)
def test_save_and_load_round_trip(cls, tmp_path):
    module = randomize_(cls(8, 24, 3, seed=0))
    path = tmp_path / "module.safetensors"
    module.save(path)
    loaded = ik_nn.SparseCoder.load(path)
    assert type(loaded) is cls and loaded.config == module.config
    for (name, p), (_, q) in zip(module.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(p, q), name
    with pytest.raises(TypeError, match="path: holds a"):
        (ik_nn.TopKSAE if issubclass(cls, ik_nn.Transcoder) else ik_nn.Transcoder).load(path)


def test_normalize_decoder_projects_the_gradient():
    module = ik_nn.TopKSAE(6, 10, 2, seed=0)
    with torch.no_grad():
        module.W_dec.mul_(3.0)
    module.W_dec.grad = torch.randn(10, 6)
    module.remove_decoder_parallel_gradient_()
    torch.testing.assert_close((module.W_dec.grad * module.W_dec).sum(-1), torch.zeros(10), atol=1e-5, rtol=0)
    module.normalize_decoder_()
    torch.testing.assert_close(module.W_dec.norm(dim=-1), torch.ones(10))
