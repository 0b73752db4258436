"""interpkernels.graphs: circuit-tracer's on-disk transcoder formats.

The oracle is circuit-tracer 0.5.0 itself, run in its own environment
(tests/circuit_tracer_side.py): its loaders must open what save_transcoders
writes, to the same tensors and the same outputs, and load_transcoders must
open what its to_safetensors writes. Kinds: per-layer JumpReLU/ReLU ("set"),
JumpReLU cross-layer transcoders ("clt") and per-layer top-k ("topk"): 0.5.0
defines a TopK activation but no file form of it; folders in the form its
repository adopted after 0.5.0 are read here and checked against 0.5.0's
SingleLayerTranscoder running its own TopK.
"""

import itertools
import json

import pytest
import torch
import yaml
from circuit_tracer_env import run_circuit_tracer
from safetensors.torch import load_file, save_file

from interpkernels import reference
from interpkernels.graphs import HookedCrossLayerTranscoder, TranscoderSet, load_transcoders, save_transcoders
from interpkernels.nn import CrossLayerTranscoder, JumpReLUCrossLayerTranscoder, JumpReLUTranscoder, Transcoder

D, M, L = 8, 24, 3
TOP_K = 4
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


def random_top_k(dtype: torch.dtype) -> TranscoderSet:
    """Top-k transcoders (layer 0 with a skip), encoder biases shifted up so that
    every token's k largest pre-activations are positive: there circuit-tracer's
    TopK (which keeps negative ones) and ours (of relu(pre)) agree."""
    layers = []
    for layer, skip in enumerate([True, False, False]):
        transcoder = Transcoder(D, M, TOP_K, skip=skip, seed=layer)
        with torch.no_grad():
            for parameter in transcoder.parameters():
                parameter.copy_(torch.randn(parameter.shape) * 0.5)
            transcoder.b_enc += 2.0
        layers.append(transcoder.to(dtype))
    return TranscoderSet(layers, "hook_resid_mid", "hook_mlp_out", scan="written-by-interpkernels")


def save_top_k_folder(transcoders: TranscoderSet, folder) -> None:
    """A top-k set in circuit-tracer's format after 0.5.0 (commit 4b1b491, PR #94:
    config.yaml's ``activation: topk`` and ``k``, which its load_transcoder_set then
    reads; the layer files as for ReLU). save_transcoders writes none: 0.5.0
    would open it as ReLU."""
    folder.mkdir(parents=True)
    for layer, transcoder in enumerate(transcoders):
        names = ["W_enc", "W_dec", "b_enc", "b_dec"] + (["W_skip"] if transcoder.W_skip is not None else [])
        save_file({name: getattr(transcoder, name).detach().contiguous() for name in names},
                  folder / f"layer_{layer}.safetensors")
    (folder / "config.yaml").write_text(yaml.safe_dump(
        {"model_kind": "transcoder_set", "activation": "topk", "k": transcoders[0].k,
         "feature_input_hook": transcoders.feature_input_hook, "feature_output_hook": transcoders.feature_output_hook,
         "scan": transcoders.scan}))


def random_clt(dtype: torch.dtype) -> HookedCrossLayerTranscoder:
    clt = JumpReLUCrossLayerTranscoder(L, D, M, M, seed=0)
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.copy_(torch.randn(parameter.shape) * 0.5)
        for threshold in clt.threshold:
            threshold.uniform_(0.0, 0.5)
    return HookedCrossLayerTranscoder(clt.to(dtype), "hook_resid_mid", "hook_mlp_out", scan="written-by-interpkernels")


def clt_outputs(clt: CrossLayerTranscoder, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense activations [L, N, M] and reconstructions [L, N, d] of every layer's x{i}."""
    with torch.no_grad():
        codes = [clt.encode_layer(layer, inputs[f"x{layer}"]) for layer in range(L)]
        activations = torch.stack([reference.densify(values, indices, M) for values, indices in codes])
        return activations, torch.stack(clt.decode(codes))


def their_clt_tensor(theirs: dict, name: str) -> torch.Tensor:
    """Our CLT parameter `name` (W_enc.2, threshold.0, b_dec, W_dec.1, ...) from
    circuit-tracer's state dict (W_enc [L, M, d], threshold [L, 1, M], W_dec.i)."""
    stem, _, layer = name.partition(".")
    if stem == "W_dec" or not layer:
        return theirs[name]
    stacked = theirs["activation_function.threshold"][:, 0] if stem == "threshold" else theirs[stem]
    return stacked[int(layer)]


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_top_k_folders_and_cross_layer_round_trips_keep_every_tensor_bit_for_bit(dtype, tmp_path):
    top_k = random_top_k(dtype)
    save_top_k_folder(top_k, tmp_path / "topk")
    loaded = load_transcoders(tmp_path / "topk")
    assert all(type(t) is Transcoder and t.k == TOP_K for t in loaded)
    assert [t.W_skip is not None for t in loaded] == [True, False, False]
    for want, got in zip(top_k, loaded):
        assert want.state_dict().keys() == got.state_dict().keys()
        assert all(torch.equal(got.state_dict()[name], tensor) and got.state_dict()[name].dtype == dtype
                   for name, tensor in want.state_dict().items())

    clt = random_clt(dtype)
    save_transcoders(clt, tmp_path / "clt")
    loaded = load_transcoders(tmp_path / "clt")
    assert isinstance(loaded, HookedCrossLayerTranscoder) and type(loaded.transcoder) is JumpReLUCrossLayerTranscoder
    assert (loaded.feature_input_hook, loaded.feature_output_hook, loaded.scan) == \
        ("hook_resid_mid", "hook_mlp_out", "written-by-interpkernels")
    assert loaded.transcoder.config["k"] == M and loaded.transcoder.config["num_layers"] == L
    want, got = clt.transcoder.state_dict(), loaded.transcoder.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(got[name], tensor) and got[name].dtype == dtype for name, tensor in want.items())
    # A bare CrossLayerTranscoder is written with the default hooks; k bounds the code.
    save_transcoders(clt.transcoder, tmp_path / "bare")
    bare = load_transcoders(tmp_path / "bare", k=2)
    assert (bare.feature_input_hook, bare.feature_output_hook, bare.scan) == ("mlp.hook_in", "mlp.hook_out",
                                                                             str(tmp_path / "bare"))
    assert bare.transcoder.encode_layer(1, torch.randn(4, D, dtype=dtype))[0].shape == (4, 2)


DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def top_k_and_cross_layer_cases(tmp_path_factory) -> dict:
    """circuit-tracer's side of the top-k and cross-layer cases, in one start of its
    environment (~10 s each): ("read", kind, dtype) -> (our transcoders, inputs,
    folder) for a folder written here and read there; ("write", dtype) -> (inputs,
    folder) for a cross-layer transcoder written there."""
    cases, jobs = {}, []
    for kind, dtype in itertools.product(["topk", "clt"], DTYPES):
        folder = tmp_path_factory.mktemp(f"read-{kind}")
        ours = random_top_k(dtype) if kind == "topk" else random_clt(dtype)
        (save_top_k_folder if kind == "topk" else save_transcoders)(ours, folder / "transcoders")
        inputs = {f"x{layer}": torch.randn(16, D, dtype=dtype) for layer in range(L)}
        save_file(inputs, folder / "inputs.safetensors")
        jobs.append(["read", folder / "transcoders", folder / "inputs.safetensors", folder / "theirs.safetensors",
                     str(dtype).removeprefix("torch.")])
        cases["read", kind, dtype] = ours, inputs, folder
    for dtype in DTYPES:
        folder = tmp_path_factory.mktemp("write-clt")
        inputs = {f"x{layer}": torch.randn(16, D, dtype=dtype) for layer in range(L)}
        save_file(inputs, folder / "inputs.safetensors")
        jobs.append(["write", folder / "transcoders", folder / "inputs.safetensors", folder / "theirs.safetensors",
                     str(dtype).removeprefix("torch."), 7, "clt"])
        cases["write", dtype] = inputs, folder
    jobs_path = tmp_path_factory.mktemp("jobs") / "jobs.json"
    jobs_path.write_text(json.dumps([[str(argument) for argument in job] for job in jobs]))
    run_circuit_tracer("batch", jobs_path)
    return cases


@pytest.mark.parametrize("kind", ["topk", "clt"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_top_k_and_saved_cross_layer_folders_open_in_circuit_tracer(kind, dtype, top_k_and_cross_layer_cases):
    ours, inputs, folder = top_k_and_cross_layer_cases["read", kind, dtype]
    theirs = load_file(folder / "theirs.safetensors")
    if kind == "topk":
        for layer, transcoder in enumerate(ours):
            for name, tensor in transcoder.state_dict().items():
                assert torch.equal(theirs[f"layer{layer}.{name}"], tensor), (layer, name)
            activations, reconstruction = our_outputs(transcoder, inputs[f"x{layer}"])
            assert bool(((activations > 0).sum(-1) == TOP_K).all()), "their top-k would keep a negative activation"
            torch.testing.assert_close(activations, theirs[f"layer{layer}.activations"], **TOLERANCE[dtype])
            torch.testing.assert_close(reconstruction, theirs[f"layer{layer}.reconstruction"], **TOLERANCE[dtype])
        return
    for name, tensor in ours.transcoder.state_dict().items():
        assert torch.equal(their_clt_tensor(theirs, name), tensor), name
    activations, reconstructions = clt_outputs(ours.transcoder, inputs)
    assert bool((activations > 0).any(-1).all()), "every token needs an active latent in every layer"
    torch.testing.assert_close(activations, theirs["activations"], **TOLERANCE[dtype])
    torch.testing.assert_close(reconstructions, theirs["reconstruction"], **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_circuit_tracer_cross_layer_folder_opens_here(dtype, top_k_and_cross_layer_cases):
    inputs, folder = top_k_and_cross_layer_cases["write", dtype]
    theirs = load_file(folder / "theirs.safetensors")
    ours = load_transcoders(folder / "transcoders")
    assert (ours.feature_input_hook, ours.feature_output_hook, ours.scan) == \
        ("mlp.hook_in", "mlp.hook_out", "written-by-circuit-tracer")
    assert type(ours.transcoder) is JumpReLUCrossLayerTranscoder
    for name, tensor in ours.transcoder.state_dict().items():
        assert torch.equal(tensor, their_clt_tensor(theirs, name)), name
    activations, reconstructions = clt_outputs(ours.transcoder, inputs)
    assert bool((activations > 0).any(-1).all()), "every token needs an active latent in every layer"
    torch.testing.assert_close(activations, theirs["activations"], **TOLERANCE[dtype])
    torch.testing.assert_close(reconstructions, theirs["reconstruction"], **TOLERANCE[dtype])


def test_save_refuses_what_circuit_tracer_cannot_hold(tmp_path):
    good = random_transcoders(torch.float32).transcoders
    with pytest.raises(TypeError, match=r"transcoders\[1\]: expected a JumpReLUTranscoder, got Transcoder .*"
                                        "would open a top-k one as ReLU"):
        save_transcoders([good[0], Transcoder(D, M, 4, seed=0)], tmp_path)
    with pytest.raises(TypeError,
                       match="transcoders: expected a JumpReLUCrossLayerTranscoder, got CrossLayerTranscoder"):
        save_transcoders(CrossLayerTranscoder(L, D, M, 4, seed=0), tmp_path)
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

    (tmp_path / "config.yaml").write_text(config.replace("transcoder_set", "sae"))
    with pytest.raises(ValueError, match="model_kind is 'sae'"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(config + "activation: gelu\n")
    with pytest.raises(ValueError, match="activation is 'gelu'"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(config + "activation: topk\nk: 4\n")
    with pytest.raises(ValueError, match="layer_0.safetensors holds thresholds but config.yaml says activation: topk"):
        load_transcoders(tmp_path)
    (tmp_path / "config.yaml").write_text(config + "activation: topk\n")
    with pytest.raises(ValueError, match="activation: topk with k = None"):
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


def test_load_names_what_is_wrong_with_a_top_k_or_cross_layer_folder(tmp_path):
    save_top_k_folder(random_top_k(torch.float32), tmp_path / "topk")
    with pytest.raises(ValueError, match="k: 3 given for a top-k folder whose k is 4"):
        load_transcoders(tmp_path / "topk", k=3)
    layer_0 = load_file(tmp_path / "topk" / "layer_0.safetensors")
    # Their to_safetensors after 0.5.0 writes k into each layer file; a different one is refused.
    save_file({**layer_0, "k": torch.tensor(5)}, tmp_path / "topk" / "layer_0.safetensors")
    with pytest.raises(ValueError, match="layer_0.safetensors holds k = 5, config.yaml k = 4"):
        load_transcoders(tmp_path / "topk")

    folder = tmp_path / "clt"
    save_transcoders(random_clt(torch.float32), folder)
    config = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(config + "activation: topk\nk: 4\n")
    with pytest.raises(ValueError, match="cross-layer transcoders are ReLU or JumpReLU"):
        load_transcoders(folder)
    (folder / "config.yaml").write_text(config)
    encoder_1 = load_file(folder / "W_enc_1.safetensors")
    save_file({name: t for name, t in encoder_1.items() if name != "threshold_1"}, folder / "W_enc_1.safetensors")
    with pytest.raises(ValueError, match="W_enc_1.safetensors: thresholds on some layers only"):
        load_transcoders(folder)
    save_file({**encoder_1, "threshold_1": -encoder_1["threshold_1"] - 1}, folder / "W_enc_1.safetensors")
    with pytest.raises(ValueError, match="W_enc_1.safetensors has negative thresholds"):
        load_transcoders(folder)
    save_file({name: t for name, t in encoder_1.items() if name != "b_dec_1"}, folder / "W_enc_1.safetensors")
    with pytest.raises(ValueError, match=r"W_enc_1.safetensors lacks \['b_dec_1'\]"):
        load_transcoders(folder)
    save_file(encoder_1, folder / "W_enc_1.safetensors")
    decoder_2 = load_file(folder / "W_dec_2.safetensors")
    save_file({"W_dec_2": decoder_2["W_dec_2"].expand(M, 2, D).contiguous()}, folder / "W_dec_2.safetensors")
    with pytest.raises(ValueError, match=r"W_dec_2 is \[24, 2, 8\], expected \[24, 1, 8\]"):
        load_transcoders(folder)
    (folder / "W_dec_2.safetensors").unlink()
    with pytest.raises(ValueError, match="has W_enc_2.safetensors but no W_dec_2.safetensors"):
        load_transcoders(folder)
    save_file(decoder_2, folder / "W_dec_2.safetensors")
    with pytest.raises(ValueError, match="folder: already holds W_enc_2.safetensors"):
        save_transcoders(JumpReLUCrossLayerTranscoder(2, D, M, M, seed=0), folder)
    (folder / "W_enc_1.safetensors").unlink()
    with pytest.raises(ValueError, match=r"found layers \[0, 2\]"):
        load_transcoders(folder)
