"""Per-layer transcoders in circuit-tracer's on-disk format.

circuit-tracer 0.5.0 (``circuit_tracer/utils/caching.py``,
``transcoder/single_layer_transcoder.py``) keeps a set of per-layer
transcoders in a folder: ``config.yaml`` (``model_kind: transcoder_set``,
``feature_input_hook``, ``feature_output_hook``, ``scan``) and one
``layer_{i}.safetensors`` per layer holding ``W_enc [M, d]``, ``W_dec [M, d]``,
``b_enc [M]``, ``b_dec [d]``, with ``activation_function.threshold [M]`` for
a JumpReLU transcoder (a ReLU one has none) and ``W_skip [d, d]`` for one
with a skip connection (``x @ W_skip.T``). Their
``load_transcoder_from_hub(<absolute folder>)`` opens such a folder, and so
does :func:`load_transcoders` here; :func:`save_transcoders` writes one.
Every layout matches ours, so weights cross unchanged, bit for bit.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from interpkernels.nn import JumpReLUTranscoder, Transcoder

# circuit-tracer's TransformerLens backend wraps each MLP so that these hooks
# see its input and output (ANCHORS.md, circuit-tracer 0.5.0).
DEFAULT_INPUT_HOOK = "mlp.hook_in"
DEFAULT_OUTPUT_HOOK = "mlp.hook_out"
THRESHOLD_KEY = "activation_function.threshold"
_REQUIRED_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec"}
_KNOWN_KEYS = _REQUIRED_KEYS | {THRESHOLD_KEY, "W_skip"}
_LAYER_FILE = re.compile(r"layer_(\d+)\.safetensors")


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


def _layer_files(folder: Path) -> dict[int, Path]:
    return {int(match.group(1)): path for path in folder.iterdir()
            if (match := _LAYER_FILE.fullmatch(path.name))}


def transcoder_from_tensors(tensors: dict[str, torch.Tensor], *, k: int | None = None,
                            where: str = "tensors") -> JumpReLUTranscoder:
    """One per-layer transcoder from circuit-tracer's tensors (a layer file's,
    or a live ``SingleLayerTranscoder``'s ``state_dict()``): a
    :class:`~interpkernels.nn.JumpReLUTranscoder` holding these very tensors,
    not copies (a ReLU one, without ``activation_function.threshold``, gets
    zero thresholds). k: latents kept per token, the largest; None keeps all.
    `where` names the tensors' origin in errors."""
    if missing := _REQUIRED_KEYS - tensors.keys():
        raise ValueError(f"{where} lacks {sorted(missing)}")
    if unknown := tensors.keys() - _KNOWN_KEYS:
        raise ValueError(f"{where} has {sorted(unknown)}, not in circuit-tracer's per-layer format")
    num_latents, d_model = tensors["W_enc"].shape
    tensors = dict(tensors)
    threshold = tensors.pop(THRESHOLD_KEY, None)
    if threshold is None:
        threshold = tensors["b_enc"].new_zeros(num_latents)
    elif threshold.shape != (num_latents,):
        raise ValueError(f"{where}: {THRESHOLD_KEY} has shape {tuple(threshold.shape)}, expected ({num_latents},)")
    elif bool((threshold < 0).any()):
        raise ValueError(f"{where} has negative thresholds; a JumpReLU code here is taken from relu(pre)")
    tensors["threshold"] = threshold
    with torch.device("meta"):
        transcoder = JumpReLUTranscoder(d_model, num_latents, num_latents if k is None else k,
                                        skip="W_skip" in tensors, initial_threshold=0.0)
    # assign=True keeps the given tensors (and dtype) instead of copying into float32 ones.
    transcoder.load_state_dict(tensors, assign=True)
    return transcoder


def load_transcoders(folder: str | Path, *, k: int | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype | None = None) -> TranscoderSet:
    """Read a folder of per-layer transcoders in circuit-tracer's format.

    Each layer becomes a :class:`~interpkernels.nn.JumpReLUTranscoder` (a ReLU
    one with zero thresholds, which computes ``pre * 1[pre > 0] = relu(pre)``).
    k: latents kept per token, the largest; None keeps all of them (every
    latent above its threshold), exact for any input. dtype: None keeps the
    stored one. Only the ``layer_{i}.safetensors`` layout is read, the one
    circuit-tracer's cache and ``to_safetensors`` write; cross-layer
    transcoders (``model_kind: cross_layer_transcoder``) are not read yet.
    """
    import yaml
    from safetensors.torch import load_file

    folder = Path(folder)
    config_path = folder / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"folder: {folder} has no config.yaml")
    config = yaml.safe_load(config_path.read_text())
    if not isinstance(config, dict) or config.get("model_kind") != "transcoder_set":
        kind = config.get("model_kind") if isinstance(config, dict) else None
        raise ValueError(f"folder: config.yaml's model_kind is {kind!r}; only 'transcoder_set' "
                         "(per-layer transcoders) is read")
    if "transcoders" in config:
        raise ValueError("folder: config.yaml lists its transcoder files ('transcoders'); only folders of "
                         "layer_{i}.safetensors files (circuit-tracer's cache layout) are read")
    for key in ("feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise ValueError(f"folder: config.yaml has no {key}")
    files = _layer_files(folder)
    if sorted(files) != list(range(len(files))) or not files:
        raise ValueError(f"folder: needs layer_0.safetensors .. layer_{{L-1}}.safetensors, found layers "
                         f"{sorted(files)}")

    transcoders = [transcoder_from_tensors(load_file(str(files[layer])), k=k, where=f"folder: {files[layer].name}")
                   .to(device=device, dtype=dtype) for layer in range(len(files))]
    return TranscoderSet(transcoders, config["feature_input_hook"], config["feature_output_hook"],
                         config.get("scan", str(folder)))


def save_transcoders(transcoders: TranscoderSet | Sequence[Transcoder], folder: str | Path, *,
                     feature_input_hook: str | None = None, feature_output_hook: str | None = None,
                     scan: str | list[str] | None = None) -> None:
    """Write per-layer transcoders (layer i first) to `folder` in circuit-tracer's format.

    Each must be a :class:`~interpkernels.nn.JumpReLUTranscoder` mapping d to d
    (their format has one d_model), all with the same number of latents: a
    top-k code has no form there (their loader builds ReLU or JumpReLU).
    The hooks and scan default to the TranscoderSet's, else to
    ``mlp.hook_in`` / ``mlp.hook_out`` and no scan. config.yaml is written
    last, as circuit-tracer's cache does: a folder without it is incomplete.
    """
    import yaml
    from safetensors.torch import save_file

    if isinstance(transcoders, TranscoderSet):
        feature_input_hook = feature_input_hook or transcoders.feature_input_hook
        feature_output_hook = feature_output_hook or transcoders.feature_output_hook
        scan = scan if scan is not None else transcoders.scan
    layers = list(transcoders)
    if not layers:
        raise ValueError("transcoders: expected at least one transcoder")
    for layer, transcoder in enumerate(layers):
        if not isinstance(transcoder, JumpReLUTranscoder):
            raise TypeError(f"transcoders[{layer}]: expected a JumpReLUTranscoder, got {type(transcoder).__name__} "
                            "(circuit-tracer's format holds ReLU and JumpReLU transcoders only)")
        if transcoder.d_in != transcoder.d_out:
            raise ValueError(f"transcoders[{layer}]: maps {transcoder.d_in} to {transcoder.d_out}; "
                             "circuit-tracer's format has one d_model")
        if transcoder.num_latents != layers[0].num_latents:
            raise ValueError(f"transcoders[{layer}]: {transcoder.num_latents} latents, transcoders[0] has "
                             f"{layers[0].num_latents}; circuit-tracer's TranscoderSet needs them equal")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if extra := sorted(index for index in _layer_files(folder) if index >= len(layers)):
        raise ValueError(f"folder: already holds layer_{extra[0]}.safetensors, which circuit-tracer would read "
                         f"as one more layer than the {len(layers)} given")

    for layer, transcoder in enumerate(layers):
        tensors = {name: getattr(transcoder, name).detach().cpu().contiguous()
                   for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
        tensors[THRESHOLD_KEY] = transcoder.threshold.detach().cpu().contiguous()
        if transcoder.W_skip is not None:
            tensors["W_skip"] = transcoder.W_skip.detach().cpu().contiguous()
        save_file(tensors, str(folder / f"layer_{layer}.safetensors"))
    config = {"model_kind": "transcoder_set",
              "feature_input_hook": feature_input_hook or DEFAULT_INPUT_HOOK,
              "feature_output_hook": feature_output_hook or DEFAULT_OUTPUT_HOOK}
    if scan is not None:
        config["scan"] = scan
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
