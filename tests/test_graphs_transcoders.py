"""interpkernels.graphs: circuit-tracer's on-disk transcoder format.

The oracle is circuit-tracer 0.5.0 itself, run in its own environment
(tests/circuit_tracer_side.py): its load_transcoder_from_hub must open what
save_transcoders writes, to the same tensors and the same outputs, and
load_transcoders must open what its to_safetensors writes.
"""

import pytest
import torch
from circuit_tracer_env import run_circuit_tracer
from safetensors.torch import load_file, save_file

from interpkernels import reference
from interpkernels.graphs import TranscoderSet, load_transcoders, save_transcoders
from interpkernels.nn import JumpReLUTranscoder, Transcoder

D, M = 8, 24
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def random_transcoders(dtype: torch.dtype) -> TranscoderSet:
    """Layer 0 JumpReLU with a skip, layer 1 JumpReLU, layer 2 ReLU (zero thresholds)."""
    layers = []
    for layer, skip in enumerate([True, False, False]):
        transcoder = JumpReLUTranscoder(D, M, M, skip=skip, seed=layer)
        with torch.no_grad():
            for parameter in transcoder.parameters():
                parameter.copy_(torch.randn(parameter.shape) * 0.5)
            transcoder.threshold.uniform_(0.0, 0.5)
            if layer == 2:
                transcoder.threshold.zero_()
        layers.append(transcoder.to(dtype))
    return TranscoderSet(layers, "hook_resid_mid", "hook_mlp_out", scan="written-by-interpkernels")


def our_outputs(transcoder: Transcoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense activations [N, M] and reconstruction [N, d]."""
    with torch.no_grad():
        values, indices = transcoder.encode(x)
        return reference.densify(values, indices, transcoder.num_latents), transcoder.reconstruct(x, values, indices)


def their_name(name: str) -> str:
    return "activation_function.threshold" if name == "threshold" else name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_round_trip_keeps_every_tensor_bit_for_bit(dtype, tmp_path):
    saved = random_transcoders(dtype)
    save_transcoders(saved, tmp_path)
    loaded = load_transcoders(tmp_path)
    assert (loaded.feature_input_hook, loaded.feature_output_hook, loaded.scan) == \
        ("hook_resid_mid", "hook_mlp_out", "written-by-interpkernels")
    assert len(loaded) == 3 and all(type(t) is JumpReLUTranscoder and t.k == M for t in loaded)
    for layer, (want, got) in enumerate(zip(saved, loaded)):
        assert want.state_dict().keys() == got.state_dict().keys()
        for name, tensor in want.state_dict().items():
            assert got.state_dict()[name].dtype == dtype and torch.equal(got.state_dict()[name], tensor), \
                (layer, name)
    # dtype converts; k bounds the code
    assert load_transcoders(tmp_path, dtype=torch.float64)[0].W_enc.dtype == torch.float64
    assert load_transcoders(tmp_path, k=2)[1].encode(torch.randn(4, D, dtype=dtype))[0].shape == (4, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_saved_folder_opens_in_circuit_tracer(dtype, tmp_path):
    ours = random_transcoders(dtype)
    save_transcoders(ours, tmp_path / "transcoders")
    inputs = {f"x{layer}": torch.randn(16, D, dtype=dtype) for layer in range(3)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    run_circuit_tracer("read", tmp_path / "transcoders", tmp_path / "inputs.safetensors",
                       tmp_path / "theirs.safetensors", str(dtype).removeprefix("torch."))
    theirs = load_file(tmp_path / "theirs.safetensors")
    for layer, transcoder in enumerate(ours):
        for name, tensor in transcoder.state_dict().items():
            assert torch.equal(theirs[f"layer{layer}.{their_name(name)}"], tensor), (layer, name)
        activations, reconstruction = our_outputs(transcoder, inputs[f"x{layer}"])
        torch.testing.assert_close(activations, theirs[f"layer{layer}.activations"], **TOLERANCE[dtype])
        torch.testing.assert_close(reconstruction, theirs[f"layer{layer}.reconstruction"], **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_circuit_tracer_folder_opens_here(dtype, tmp_path):
    inputs = {f"x{layer}": torch.randn(16, D, dtype=dtype) for layer in range(3)}
    save_file(inputs, tmp_path / "inputs.safetensors")
    run_circuit_tracer("write", tmp_path / "transcoders", tmp_path / "inputs.safetensors",
                       tmp_path / "theirs.safetensors", str(dtype).removeprefix("torch."), 7)
    theirs = load_file(tmp_path / "theirs.safetensors")
    ours = load_transcoders(tmp_path / "transcoders")
    assert (ours.feature_input_hook, ours.feature_output_hook, ours.scan) == \
        ("mlp.hook_in", "mlp.hook_out", "written-by-circuit-tracer")
    assert [t.W_skip is not None for t in ours] == [True, False, False]
    for layer, transcoder in enumerate(ours):
        for name, tensor in transcoder.state_dict().items():
            # Their ReLU layer (2) has no threshold: ours holds zeros there.
            want = theirs.get(f"layer{layer}.{their_name(name)}", torch.zeros(M, dtype=dtype))
            assert torch.equal(tensor, want), (layer, name)
        activations, reconstruction = our_outputs(transcoder, inputs[f"x{layer}"])
        assert bool((activations > 0).any()), "a layer with no active latent checks nothing"
        torch.testing.assert_close(activations, theirs[f"layer{layer}.activations"], **TOLERANCE[dtype])
        torch.testing.assert_close(reconstruction, theirs[f"layer{layer}.reconstruction"], **TOLERANCE[dtype])


def test_save_refuses_what_circuit_tracer_cannot_hold(tmp_path):
    good = random_transcoders(torch.float32).transcoders
    with pytest.raises(TypeError, match=r"transcoders\[1\]: expected a JumpReLUTranscoder, got Transcoder"):
        save_transcoders([good[0], Transcoder(D, M, 4, seed=0)], tmp_path)
    with pytest.raises(ValueError, match=r"transcoders\[0\]: maps 8 to 5"):
        save_transcoders([JumpReLUTranscoder(D, M, M, d_out=5, seed=0)], tmp_path)
    with pytest.raises(ValueError, match=r"transcoders\[1\]: 12 latents"):
        save_transcoders([good[0], JumpReLUTranscoder(D, 12, 12, seed=0)], tmp_path)
    with pytest.raises(ValueError, match="transcoders: expected at least one"):
        save_transcoders([], tmp_path)
    save_transcoders(good, tmp_path)
    with pytest.raises(ValueError, match="folder: already holds layer_2.safetensors"):
        save_transcoders(good[:2], tmp_path)


def test_load_names_what_is_wrong_with_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="folder: .* has no config.yaml"):
        load_transcoders(tmp_path)
    save_transcoders(random_transcoders(torch.float32), tmp_path)
    config = (tmp_path / "config.yaml").read_text()

    (tmp_path / "config.yaml").write_text(config.replace("transcoder_set", "cross_layer_transcoder"))
    with pytest.raises(ValueError, match="model_kind is 'cross_layer_transcoder'"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(config + "transcoders: [hf://org/repo/layer_0.npz]\n")
    with pytest.raises(ValueError, match="lists its transcoder files"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(config.replace("feature_output_hook", "other_hook"))
    with pytest.raises(ValueError, match="config.yaml has no feature_output_hook"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(config)

    layer_1 = load_file(tmp_path / "layer_1.safetensors")
    save_file({**layer_1, "log_thresholds": layer_1["b_enc"].clone()}, tmp_path / "layer_1.safetensors")
    with pytest.raises(ValueError, match=r"layer_1.safetensors has \['log_thresholds'\]"):
        load_transcoders(tmp_path)
    save_file({**layer_1, "activation_function.threshold": -layer_1["b_enc"].abs()}, tmp_path / "layer_1.safetensors")
    with pytest.raises(ValueError, match="layer_1.safetensors has negative thresholds"):
        load_transcoders(tmp_path)
    save_file({name: t for name, t in layer_1.items() if name != "W_dec"}, tmp_path / "layer_1.safetensors")
    with pytest.raises(ValueError, match=r"layer_1.safetensors lacks \['W_dec'\]"):
        load_transcoders(tmp_path)
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"found layers \[0, 2\]"):
        load_transcoders(tmp_path)
