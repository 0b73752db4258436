"""Transcoders in circuit-tracer's on-disk format.

circuit-tracer 0.5.0 keeps transcoders in a folder with a ``config.yaml``
(``model_kind``, ``feature_input_hook``, ``feature_output_hook``, ``scan``)
and safetensors files, in one of two layouts:

- ``model_kind: transcoder_set`` (``utils/caching.py``,
  ``transcoder/single_layer_transcoder.py``): one ``layer_{i}.safetensors``
  per layer holding ``W_enc [M, d]``, ``W_dec [M, d]``, ``b_enc [M]``,
  ``b_dec [d]``, with ``activation_function.threshold [M]`` for a JumpReLU
  transcoder (a ReLU one has none) and ``W_skip [d, d]`` for one with a skip
  connection (``x @ W_skip.T``). circuit-tracer 0.5.0 (PyPI) defines a
  ``TopK`` activation (``transcoder/activation_functions.py``) that its
  SingleLayerTranscoder and ``attribute()`` run, but none of its loaders
  builds one and its ``to_safetensors`` records none. Its repository after
  0.5.0 (commit 4b1b491, PR #94) marks a top-k set with ``activation: topk``
  and ``k`` in config.yaml (``load_transcoder_set(activation=, k=)``) and a
  scalar ``k`` in each layer file; such folders are read here.
- ``model_kind: cross_layer_transcoder``
  (``transcoder/cross_layer_transcoder.py``, ``load_clt`` and
  ``to_safetensors``): per layer i, ``W_enc_{i}.safetensors`` holding
  ``W_enc_{i} [M, d]``, ``b_enc_{i} [M]``, ``b_dec_{i} [d]`` and, for a
  JumpReLU one, ``threshold_{i} [M]``; ``W_dec_{i}.safetensors`` holding
  ``W_dec_{i} [M, L - i, d]`` (layer i's latents to the MLP outputs of layers
  i..L-1). Their format has no skip connection for these (``load_clt``
  never reads one) and no top-k code (``relu`` or ``jump_relu`` only).

Their ``load_transcoder_from_hub(<absolute folder>)`` opens such a folder
(a top-k one as ReLU layers: 0.5.0 ignores ``activation``), and so does
:func:`load_transcoders` here; :func:`save_transcoders` writes one (not for
top-k sets, which 0.5.0 would open as ReLU). Every layout matches ours, so
weights cross unchanged, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from interpkernels.nn import CrossLayerTranscoder, JumpReLUCrossLayerTranscoder, JumpReLUTranscoder, Transcoder

# circuit-tracer's TransformerLens backend wraps each MLP so that these hooks
# see its input and output (ANCHORS.md, circuit-tracer 0.5.0).
DEFAULT_INPUT_HOOK = "mlp.hook_in"
DEFAULT_OUTPUT_HOOK = "mlp.hook_out"
THRESHOLD_KEY = "activation_function.threshold"
TOPK_KEY = "k"
_REQUIRED_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec"}
_KNOWN_KEYS = _REQUIRED_KEYS | {THRESHOLD_KEY, "W_skip", TOPK_KEY}
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")
_CLT_ENCODER_FILE = re.compile(r"W_enc_(\d+)\.safetensors")
# What load_transcoder_set branches on after 0.5.0 (absent: JumpReLU when thresholds are stored, else ReLU).
_ACTIVATIONS = (None, "relu", "topk")


@dataclass
class TranscoderSet:
    """One transcoder per layer, 0..L-1, and where they read and write in the
    model (circuit-tracer's hook names, relative to a block). Iterates, indexes
    and has a length like the list of transcoders."""

    transcoders: list[Transcoder]
    feature_input_hook: str = DEFAULT_INPUT_HOOK
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK
    scan: str | list[str] | None = None

    def __len__(self) -> int:
        return len(self.transcoders)

    def __getitem__(self, layer: int) -> Transcoder:
        return self.transcoders[layer]

    def __iter__(self) -> Iterator[Transcoder]:
        return iter(self.transcoders)


@dataclass
class HookedCrossLayerTranscoder:
    """A cross-layer transcoder and where it reads and writes in the model
    (circuit-tracer's hook names, relative to a block), as a
    ``cross_layer_transcoder`` folder holds it."""

    transcoder: CrossLayerTranscoder
    feature_input_hook: str = DEFAULT_INPUT_HOOK
    feature_output_hook: str = DEFAULT_OUTPUT_HOOK
    scan: str | list[str] | None = None


def _numbered_files(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(match.group(1)): path for path in folder.iterdir() if (match := pattern.fullmatch(path.name))}


def _read_config(folder: Path) -> dict:
    import yaml

    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"folder: {folder} has no config.yaml")
    config = yaml.safe_load(config_path.read_text())
    kind = config.get("model_kind") if isinstance(config, dict) else None
    if kind not in ("transcoder_set", "cross_layer_transcoder"):
        raise ValueError(f"folder: config.yaml's model_kind is {kind!r}; 'transcoder_set' (per-layer "
                         "transcoders) and 'cross_layer_transcoder' are read")
    if "transcoders" in config:
        raise ValueError("folder: config.yaml lists its transcoder files ('transcoders'); only folders of "
                         "safetensors files (circuit-tracer's cache layout) are read")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise ValueError(f"folder: config.yaml has no {key}")
    if config.get("activation") not in _ACTIVATIONS:
        raise ValueError(f"folder: config.yaml's activation is {config['activation']!r}; expected one of "
                         f"{[a for a in _ACTIVATIONS if a]}")
    return config


def _consecutive(files: dict[int, Path], first_name: str) -> list[Path]:
    if sorted(files) != list(range(len(files))) or not files:
        raise ValueError(f"folder: needs {first_name.format(0)} .. {first_name.format('{L-1}')}, found layers "
                         f"{sorted(files)}")
    return [files[layer] for layer in range(len(files))]


def _checked_threshold(threshold: torch.Tensor | None, like: torch.Tensor, where: str, name: str) -> torch.Tensor:
    """A JumpReLU threshold (stored as `name`), or zeros for a ReLU layer (``pre * 1[pre > 0] = relu(pre)``)."""
    if threshold is None:
        return like.new_zeros(like.shape)
    if threshold.shape != like.shape:
        raise ValueError(f"{where}: {name} has shape {tuple(threshold.shape)}, expected {tuple(like.shape)}")
    if bool((threshold < 0).any()):
        raise ValueError(f"{where} has negative thresholds; a JumpReLU code here is taken from relu(pre)")
    return threshold


def load_transcoders(folder: str | Path, *, k: int | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> TranscoderSet | HookedCrossLayerTranscoder:
    """Read a folder of transcoders in circuit-tracer's format.

    Per-layer transcoders (``transcoder_set``) come back in a
    :class:`TranscoderSet`: each layer a
    :class:`~interpkernels.nn.JumpReLUTranscoder` (a ReLU one with zero
    thresholds), or, for ``activation: topk`` (circuit-tracer's format after
    0.5.0), a top-k :class:`~interpkernels.nn.Transcoder` with the config's ``k``. A
    cross-layer transcoder comes back as a :class:`HookedCrossLayerTranscoder`
    holding a :class:`~interpkernels.nn.JumpReLUCrossLayerTranscoder`.
    k: for JumpReLU and ReLU codes, latents kept per token (and layer), the
    largest; None keeps all of them (every latent above its threshold), exact
    for any input. A top-k folder's k is its own. dtype: None keeps the
    stored one.

    circuit-tracer's top-k code is the k largest pre-activations, negative
    ones included; interpkernels' is the k largest of ``relu(pre)``. They
    agree wherever a token's k-th largest pre-activation is positive;
    elsewhere theirs keeps negative activations that ours zeroes.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = _read_config(folder)
    if config["model_kind"] == "cross_layer_transcoder":
        transcoder = _load_cross_layer(folder, config, k, load_file)
        return HookedCrossLayerTranscoder(transcoder.to(device=device, dtype=dtype), config["feature_input_hook"],
                                          config["feature_output_hook"], config.get("scan", str(folder)))

    top_k = None
    if config.get("activation") == "topk":
        top_k = config.get("k")
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"folder: config.yaml says activation: topk with k = {top_k!r}; expected a positive int")
        if k is not None and k != top_k:
            raise ValueError(f"k: {k} given for a top-k folder whose k is {top_k}")
    files = _consecutive(_numbered_files(folder, _LAYER_FILE), "layer_{}.safetensors")
    transcoders = [transcoder_from_tensors(load_file(str(path)), k=k, top_k=top_k, activation=config.get("activation"),
                                           where=f"folder: {path.name}").to(device=device, dtype=dtype)
                   for path in files]
    return TranscoderSet(transcoders, config["feature_input_hook"], config["feature_output_hook"],
                         config.get("scan", str(folder)))


def transcoder_from_tensors(tensors: dict[str, torch.Tensor], *, k: int | None = None, top_k: int | None = None,
                            activation: str | None = None, where: str = "tensors") -> Transcoder:
    """One per-layer transcoder from circuit-tracer's tensors (a layer file's, or a live
    ``SingleLayerTranscoder``'s), holding these very tensors, not copies.

    top_k None: a :class:`~interpkernels.nn.JumpReLUTranscoder` (a ReLU one, without
    ``activation_function.threshold``, gets zero thresholds) keeping the k largest latents per
    token (k None: all). top_k: a top-k :class:`~interpkernels.nn.Transcoder` with that k
    (``activation: topk``). activation: the folder's config.yaml ``activation``, checked against the
    tensors. `where` names the tensors' origin in errors."""
    if missing := _REQUIRED_KEYS - tensors.keys():
        raise ValueError(f"{where} lacks {sorted(missing)}")
    if unknown := tensors.keys() - _KNOWN_KEYS:
        raise ValueError(f"{where} has {sorted(unknown)}, not in circuit-tracer's per-layer format")
    num_latents, d_model = tensors["W_enc"].shape
    tensors = dict(tensors)
    stored_k = tensors.pop(TOPK_KEY, None)
    if top_k is None:
        if stored_k is not None:
            raise ValueError(f"{where} holds a top-k k but config.yaml does not say activation: topk")
        if activation == "relu" and THRESHOLD_KEY in tensors:
            raise ValueError(f"{where} holds thresholds but config.yaml says activation: relu")
        tensors["threshold"] = _checked_threshold(tensors.pop(THRESHOLD_KEY, None), tensors["b_enc"], where,
                                                 THRESHOLD_KEY)
        with torch.device("meta"):
            transcoder = JumpReLUTranscoder(d_model, num_latents, num_latents if k is None else k,
                                            skip="W_skip" in tensors, initial_threshold=0.0)
    else:
        if THRESHOLD_KEY in tensors:
            raise ValueError(f"{where} holds thresholds but config.yaml says activation: topk")
        if stored_k is not None and int(stored_k) != top_k:
            raise ValueError(f"{where} holds k = {int(stored_k)}, config.yaml k = {top_k}")
        with torch.device("meta"):
            transcoder = Transcoder(d_model, num_latents, top_k, skip="W_skip" in tensors)
    # assign=True keeps the given tensors (and dtype) instead of copying into float32 ones.
    transcoder.load_state_dict(tensors, assign=True)
    return transcoder


def _load_cross_layer(folder: Path, config: dict, k: int | None, load_file) -> JumpReLUCrossLayerTranscoder:
    if config.get("activation") == "topk":
        raise ValueError("folder: config.yaml says activation: topk; circuit-tracer's cross-layer transcoders "
                         "are ReLU or JumpReLU")
    encoder_files = _consecutive(_numbered_files(folder, _CLT_ENCODER_FILE), "W_enc_{}.safetensors")
    n_layers = len(encoder_files)
    state, has_threshold = {}, None
    for layer, path in enumerate(encoder_files):
        where = f"folder: {path.name}"
        tensors = load_file(str(path))
        names = {f"W_enc_{layer}", f"b_enc_{layer}", f"b_dec_{layer}"}
        if missing := names - tensors.keys():
            raise ValueError(f"{where} lacks {sorted(missing)}")
        if unknown := tensors.keys() - names - {f"threshold_{layer}"}:
            raise ValueError(f"{where} has {sorted(unknown)}, not in circuit-tracer's cross-layer format")
        # Their load_clt reads thresholds for every layer when layer 0 has them.
        if has_threshold is None:
            has_threshold = "threshold_0" in tensors
        elif has_threshold != (f"threshold_{layer}" in tensors):
            raise ValueError(f"{where}: thresholds on some layers only")
        state[f"W_enc.{layer}"] = tensors[f"W_enc_{layer}"]
        state[f"b_enc.{layer}"] = tensors[f"b_enc_{layer}"]
        state[f"threshold.{layer}"] = _checked_threshold(tensors.get(f"threshold_{layer}"),
                                                         tensors[f"b_enc_{layer}"], where, f"threshold_{layer}")
        state.setdefault("b_dec", []).append(tensors[f"b_dec_{layer}"])
        decoder_path = folder / f"W_dec_{layer}.safetensors"
        if not decoder_path.is_file():
            raise ValueError(f"folder: has {path.name} but no {decoder_path.name}")
        decoder = load_file(str(decoder_path))
        if set(decoder) != {f"W_dec_{layer}"}:
            raise ValueError(f"folder: {decoder_path.name} holds {sorted(decoder)}, expected ['W_dec_{layer}']")
        state[f"W_dec.{layer}"] = decoder[f"W_dec_{layer}"]
    num_latents, d_model = state["W_enc.0"].shape
    for layer in range(n_layers):
        want = (num_latents, n_layers - layer, d_model)
        if tuple(state[f"W_dec.{layer}"].shape) != want:
            raise ValueError(f"folder: W_dec_{layer}.safetensors's W_dec_{layer} is "
                             f"{list(state[f'W_dec.{layer}'].shape)}, expected {list(want)} "
                             f"(latents, layers {layer}..{n_layers - 1}, d_model)")
    state["b_dec"] = torch.stack(state["b_dec"])
    with torch.device("meta"):
        transcoder = JumpReLUCrossLayerTranscoder(n_layers, d_model, num_latents, num_latents if k is None else k,
                                                  initial_threshold=0.0)
    transcoder.load_state_dict(state, assign=True)
    return transcoder


def save_transcoders(transcoders: TranscoderSet | HookedCrossLayerTranscoder | CrossLayerTranscoder
                     | Sequence[Transcoder], folder: str | Path, *,
                     feature_input_hook: str | None = None, feature_output_hook: str | None = None,
                     scan: str | list[str] | None = None) -> None:
    """Write transcoders to `folder` in circuit-tracer's format.

    Per-layer transcoders (layer i first):
    :class:`~interpkernels.nn.JumpReLUTranscoder`s (ReLU is zero thresholds)
    mapping d to d (their format has one d_model), all with the same number
    of latents. Not top-k ones: circuit-tracer 0.5.0's loaders build ReLU or
    JumpReLU layers and would open a top-k set as ReLU. A cross-layer
    transcoder: a :class:`~interpkernels.nn.JumpReLUCrossLayerTranscoder`
    (their cross-layer format has no top-k code). The hooks and scan default to the
    TranscoderSet's or HookedCrossLayerTranscoder's, else to ``mlp.hook_in``
    / ``mlp.hook_out`` and no scan. config.yaml is written last, as
    circuit-tracer's cache does: a folder without it is incomplete.
    """
    import yaml

    if isinstance(transcoders, (TranscoderSet, HookedCrossLayerTranscoder)):
        feature_input_hook = feature_input_hook or transcoders.feature_input_hook
        feature_output_hook = feature_output_hook or transcoders.feature_output_hook
        scan = scan if scan is not None else transcoders.scan
    if isinstance(transcoders, HookedCrossLayerTranscoder):
        transcoders = transcoders.transcoder
    folder = Path(folder)
    if isinstance(transcoders, CrossLayerTranscoder):
        config = _save_cross_layer(transcoders, folder)
    else:
        config = _save_per_layer(list(transcoders), folder)
    config |= {"feature_input_hook": feature_input_hook or DEFAULT_INPUT_HOOK,
               "feature_output_hook": feature_output_hook or DEFAULT_OUTPUT_HOOK}
    if scan is not None:
        config["scan"] = scan
    (folder / "config.yaml").write_text(yaml.safe_dump(config))


def _tensor(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.detach().cpu().contiguous()


def _refuse_extra_layers(folder: Path, pattern: re.Pattern, name: str, n_layers: int) -> None:
    if extra := sorted(index for index in _numbered_files(folder, pattern) if index >= n_layers):
        raise ValueError(f"folder: already holds {name.format(extra[0])}, which circuit-tracer would read "
                         f"as one more layer than the {n_layers} given")


def _save_per_layer(layers: list[Transcoder], folder: Path) -> dict:
    from safetensors.torch import save_file

    if not layers:
        raise ValueError("transcoders: expected at least one transcoder")
    for layer, transcoder in enumerate(layers):
        if not isinstance(transcoder, JumpReLUTranscoder):
            raise TypeError(f"transcoders[{layer}]: expected a JumpReLUTranscoder, got {type(transcoder).__name__} "
                            "(circuit-tracer 0.5.0's loaders build ReLU and JumpReLU transcoders only: they would "
                            "open a top-k one as ReLU)")
        if transcoder.d_in != transcoder.d_out:
            raise ValueError(f"transcoders[{layer}]: maps {transcoder.d_in} to {transcoder.d_out}; "
                             "circuit-tracer's format has one d_model")
        if transcoder.num_latents != layers[0].num_latents:
            raise ValueError(f"transcoders[{layer}]: {transcoder.num_latents} latents, transcoders[0] has "
                             f"{layers[0].num_latents}; circuit-tracer's TranscoderSet needs them equal")
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_extra_layers(folder, _LAYER_FILE, "layer_{}.safetensors", len(layers))
    for layer, transcoder in enumerate(layers):
        tensors = {name: _tensor(getattr(transcoder, name))
                   for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")}
        tensors[THRESHOLD_KEY] = tensors.pop("threshold")
        if transcoder.W_skip is not None:
            tensors["W_skip"] = _tensor(transcoder.W_skip)
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
    return {"model_kind": "transcoder_set"}


def _save_cross_layer(transcoder: CrossLayerTranscoder, folder: Path) -> dict:
    from safetensors.torch import save_file

    if not isinstance(transcoder, JumpReLUCrossLayerTranscoder):
        raise TypeError(f"transcoders: expected a JumpReLUCrossLayerTranscoder, got {type(transcoder).__name__} "
                        "(circuit-tracer's cross-layer transcoders are ReLU or JumpReLU, not top-k)")
    n_layers = transcoder.config["num_layers"]
    folder.mkdir(parents=True, exist_ok=True)
    _refuse_extra_layers(folder, _CLT_ENCODER_FILE, "W_enc_{}.safetensors", n_layers)
    for layer in range(n_layers):
        save_file({f"W_enc_{layer}": _tensor(transcoder.W_enc[layer]),
                   f"b_enc_{layer}": _tensor(transcoder.b_enc[layer]),
                   f"b_dec_{layer}": _tensor(transcoder.b_dec[layer]),
                   f"threshold_{layer}": _tensor(transcoder.threshold[layer])},
                  str(folder / f"W_enc_{layer}.safetensors"))
        save_file({f"W_dec_{layer}": _tensor(transcoder.W_dec[layer])}, str(folder / f"W_dec_{layer}.safetensors"))
    return {"model_kind": "cross_layer_transcoder"}
