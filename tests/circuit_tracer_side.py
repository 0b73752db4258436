"""circuit-tracer 0.5.0's side of the graph tests, run in its own environment
(setup_helpers/circuit-tracer-env.sh) by tests/circuit_tracer_env.py. It
imports circuit_tracer, torch, safetensors and yaml only, never interpkernels:
whatever it writes comes from circuit-tracer's code alone.

    python circuit_tracer_side.py read FOLDER INPUTS OUT DTYPE
        FOLDER opened by circuit-tracer (open_folder); OUT gets every layer's
        parameters, and its activations and forward output on INPUTS' x{i}
        (a cross-layer transcoder: its parameters, "activations" [L, N, M] and
        "reconstruction" [L, N, d] on the x{i} stacked).
    python circuit_tracer_side.py write FOLDER INPUTS OUT DTYPE SEED [KIND]
        Random transcoders built with circuit-tracer's classes, saved to FOLDER
        as its cache does (to_safetensors, then config.yaml); OUT as for read.
        KIND "set" (default): per-layer, layer 0 JumpReLU with a skip, layer 1
        JumpReLU, layer 2 ReLU; "clt": a JumpReLU CrossLayerTranscoder of 3 layers.
    python circuit_tracer_side.py graph FOLDER...
        For each FOLDER, circuit-tracer's attribute() on the TransformerLens
        model of FOLDER/config.json (HookedTransformerConfig keywords, plus
        "dtype", attribute()'s keywords under "attribute", a list of prune_graph()'s under "prune") with the
        parameters of FOLDER/model.safetensors, the transcoders of
        FOLDER/transcoders and the prompt FOLDER/tokens.safetensors ("tokens",
        BOS first); FOLDER/theirs.safetensors gets the Graph's tensors, the
        masks and cumulative scores of prune_graph() and compute_graph_scores().
    python circuit_tracer_side.py frontend FOLDER...
        As graph, then for each FOLDER (its config.json also holds create_graph_files'
        thresholds under "frontend"): create_graph_files on their Graph into
        FOLDER/theirs_json; FOLDER/ours/graph.json validated by their frontend's
        pydantic Model; FOLDER/ours.pt opened by Graph.from_pt; FOLDER/graphs.json
        and FOLDER/graphs.safetensors get both Graphs' fields ("theirs", "loaded")
        and the validated node and link counts.
    python circuit_tracer_side.py batch JOBS
        Each [command, arguments...] of the JSON list in JOBS (the commands
        above), in one start of this environment.
"""

import json
import sys

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

DTYPES = {"float32": torch.float32, "float64": torch.float64}
HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}


def describe(transcoders, inputs: dict) -> dict:
    """Parameters and outputs of circuit-tracer transcoders, as ``layer{i}.<name>`` tensors."""
    out = {}
    for layer, transcoder in enumerate(transcoders):
        for name, tensor in transcoder.state_dict().items():
            out[f"layer{layer}.{name}"] = tensor.contiguous()
        x = inputs[f"x{layer}"].to(transcoder.dtype)
        with torch.no_grad():
            out[f"layer{layer}.activations"] = transcoder.encode(x).contiguous()
            out[f"layer{layer}.reconstruction"] = transcoder(x).contiguous()
    return out


def describe_clt(clt, inputs: dict) -> dict:
    """Parameters of a circuit-tracer CrossLayerTranscoder, and its activations and
    forward output on the inputs stacked by layer."""
    out = {name: tensor.contiguous() for name, tensor in clt.state_dict().items()}
    x = torch.stack([inputs[f"x{layer}"] for layer in range(clt.n_layers)]).to(clt.dtype)
    with torch.no_grad():
        out["activations"] = clt.encode(x).contiguous()
        out["reconstruction"] = clt(x).contiguous()
    return out


def open_folder(folder: str, dtype: torch.dtype, *, lazy_decoder: bool = False):
    """circuit-tracer's transcoders in FOLDER (load_transcoder_from_hub), and its
    config. 0.5.0's loaders build ReLU or JumpReLU layers only; for a top-k folder
    (config.yaml's activation: topk and k, the format after 0.5.0) each layer,
    loaded as ReLU from its weights, gets 0.5.0's own TopK(k) activation."""
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub

    transcoders, config = load_transcoder_from_hub(folder, device=torch.device("cpu"), dtype=dtype,
                                                   lazy_decoder=lazy_decoder)
    if config.get("activation") == "topk":
        for transcoder in transcoders:
            transcoder.activation_function = TopK(config["k"])
    return transcoders, config


def read(folder: str, inputs: str, out: str, dtype: str) -> None:
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    transcoders, config = open_folder(folder, DTYPES[dtype])
    tensors = (describe_clt if isinstance(transcoders, CrossLayerTranscoder) else describe)(transcoders,
                                                                                            load_file(inputs))
    save_file(tensors, out,
              metadata={key: str(config[key]) for key in ("feature_input_hook", "feature_output_hook", "scan")})


def write(folder: str, inputs: str, out: str, dtype: str, seed: str, kind: str = "set") -> None:
    from circuit_tracer.transcoder import SingleLayerTranscoder, TranscoderSet
    from circuit_tracer.transcoder.activation_functions import JumpReLU

    generator = torch.Generator().manual_seed(int(seed))
    d_model, d_transcoder = 8, 24
    if kind == "clt":
        return write_clt(folder, inputs, out, DTYPES[dtype], generator, d_model, d_transcoder)
    layers = {}
    for layer, (activation, skip) in enumerate([("jumprelu", True), ("jumprelu", False), ("relu", False)]):
        function = (JumpReLU(torch.rand(d_transcoder, generator=generator, dtype=DTYPES[dtype]) * 0.5, 0.1)
                    if activation == "jumprelu" else F.relu)
        transcoder = SingleLayerTranscoder(d_model, d_transcoder, function, layer, skip_connection=skip,
                                           device=torch.device("cpu"), dtype=DTYPES[dtype])
        with torch.no_grad():
            for parameter in (transcoder.W_enc, transcoder.W_dec, transcoder.b_enc, transcoder.b_dec,
                              *([transcoder.W_skip] if skip else [])):
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.5)
        layers[layer] = transcoder
    transcoders = TranscoderSet(layers, scan="written-by-circuit-tracer", **HOOKS)
    transcoders.to_safetensors(folder)
    # What save_transcoders_to_cache writes after the layer files.
    with open(f"{folder}/config.yaml", "w") as f:
        yaml.dump({"model_kind": "transcoder_set", "scan": transcoders.scan, **HOOKS}, f)
    save_file(describe(transcoders, load_file(inputs)), out)


def write_clt(folder: str, inputs: str, out: str, dtype: torch.dtype, generator, d_model: int,
              d_transcoder: int) -> None:
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    clt = CrossLayerTranscoder(3, d_transcoder, d_model, activation_function="jump_relu", lazy_decoder=False,
                               scan="written-by-circuit-tracer", device=torch.device("cpu"), dtype=dtype, **HOOKS)
    with torch.no_grad():
        for parameter in clt.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.5)
        clt.activation_function.threshold.copy_(torch.rand(clt.activation_function.threshold.shape,
                                                           generator=generator, dtype=dtype) * 0.5)
    clt.to_safetensors(folder)
    with open(f"{folder}/config.yaml", "w") as f:
        yaml.dump({"model_kind": "cross_layer_transcoder", "scan": clt.scan, **HOOKS}, f)
    save_file(describe_clt(clt, load_file(inputs)), out)


def word_level_tokenizer(vocabulary_size: int, folder: str, *, text_prompts: bool = False):
    """A tokenizer for the test's vocabulary, built here (no download; token 0 is
    BOS) and loaded from a folder, as TransformerLens reloads it by name.
    text_prompts: text splits on whitespace, and the last id is a pad token,
    the special token their ensure_tokenized puts before a prompt that starts
    with none (it passes over id 0, which is falsy)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocabulary = {"<bos>": 0, **{f"w{i}": i for i in range(1, vocabulary_size)}}
    special = {"bos_token": "<bos>"}
    if text_prompts:
        del vocabulary[f"w{vocabulary_size - 1}"]
        vocabulary["<pad>"] = vocabulary_size - 1
        special["pad_token"] = "<pad>"
    tokenizer = Tokenizer(WordLevel(vocabulary, unk_token="w1"))
    if text_prompts:
        tokenizer.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def graphs(*folders: str) -> None:
    for folder in folders:
        graph(folder)


def replacement_model(folder: str, *, lazy_decoder: bool = False, text_prompts: bool = False):
    """circuit-tracer's ReplacementModel (TransformerLens backend) of FOLDER, as
    the graph command describes it, and FOLDER/config.json's other entries;
    the tokenizer is saved to FOLDER/tokenizer."""
    from circuit_tracer import ReplacementModel
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
    from transformer_lens import HookedTransformerConfig

    config = json.loads(open(f"{folder}/config.json").read())
    options = {key: config.pop(key) for key in ("frontend", "attribute", "prune", "dropin") if key in config}
    dtype = DTYPES[config.pop("dtype")]
    # attribute() allocates its edge matrix in the default dtype.
    torch.set_default_dtype(dtype)
    transcoders, _ = open_folder(f"{folder}/transcoders", dtype, lazy_decoder=lazy_decoder)
    tokenizer = word_level_tokenizer(config["d_vocab"], f"{folder}/tokenizer", text_prompts=text_prompts)
    model = ReplacementModel.from_config(HookedTransformerConfig(**config, dtype=dtype, device="cpu"), transcoders,
                                         backend="transformerlens", tokenizer=tokenizer)
    # The replacement model wraps each MLP (mlp.old_mlp) and the unembedding (unembed.old_unembed).
    parameters = {name.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): tensor
                  for name, tensor in load_file(f"{folder}/model.safetensors").items()}
    missing, unexpected = model.load_state_dict(parameters, strict=False)
    # Left as built: buffers (causal masks, rotary tables) and the transcoders, loaded above.
    kept = ({name for name, _ in model.named_buffers(remove_duplicate=False)}
            | {name for name in missing if name.startswith("transcoders.")})
    assert not unexpected and set(missing) <= kept, (missing, unexpected)
    return model, options


def pruned_fields(graph, prune_options: list[dict]) -> dict:
    """compute_graph_scores(graph) and, for each of prune_graph()'s options,
    its masks and cumulative scores (numbered as the options)."""
    from circuit_tracer.graph import compute_graph_scores, prune_graph

    tensors = {"scores": torch.tensor(compute_graph_scores(graph), dtype=torch.float64)}
    for index, options in enumerate(prune_options):
        pruned = prune_graph(graph, **options)
        tensors |= {f"node_mask{index}": pruned.node_mask, f"edge_mask{index}": pruned.edge_mask,
                    f"cumulative_scores{index}": pruned.cumulative_scores}
    return tensors


def graph(folder: str) -> None:
    from circuit_tracer import attribute

    model, options = replacement_model(folder)
    result = attribute(load_file(f"{folder}/tokens.safetensors")["tokens"], model, **options["attribute"])
    tensors = {"adjacency": result.adjacency_matrix, "active_features": result.active_features,
               "activation_values": result.activation_values, "selected_features": result.selected_features,
               "logit_tokens": result.logit_token_ids, "logit_probabilities": result.logit_probabilities}
    tensors |= pruned_fields(result, options["prune"])
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, f"{folder}/theirs.safetensors")
    return result


def graph_fields(graph, prefix: str) -> tuple[dict, dict]:
    """A circuit-tracer Graph's tensors (``prefix.name``) and its other fields, as JSON."""
    tensors = {f"{prefix}.{name}": getattr(graph, name).contiguous()
               for name in ("adjacency_matrix", "active_features", "selected_features", "activation_values",
                            "logit_probabilities", "input_tokens", "logit_token_ids")}
    config = {name: str(value) for name, value in graph.cfg.to_dict().items()}
    return tensors, {"input_string": graph.input_string, "vocab_size": graph.vocab_size, "scan": graph.scan,
                     "n_pos": graph.n_pos, "cfg": config, "cfg_type": type(graph.cfg).__name__,
                     "logit_targets": [[target.token_str, target.vocab_idx] for target in graph.logit_targets]}


def frontend(*folders: str) -> None:
    from circuit_tracer.frontend.graph_models import Model
    from circuit_tracer.graph import Graph
    from circuit_tracer.utils.create_graph_files import create_graph_files

    for folder in folders:
        theirs = graph(folder)
        loaded = Graph.from_pt(f"{folder}/ours.pt")
        tensors, fields = {}, {}
        for prefix, one in (("theirs", theirs), ("loaded", loaded)):
            one_tensors, fields[prefix] = graph_fields(one, prefix)
            tensors |= one_tensors
        validated = Model.model_validate_json(open(f"{folder}/ours/graph.json").read())
        fields["validated"] = {"nodes": len(validated.nodes), "links": len(validated.links)}
        thresholds = json.loads(open(f"{folder}/config.json").read())["frontend"]
        # A model built from a config names no tokenizer; create_graph_files loads it by this name.
        theirs.cfg.tokenizer_name = f"{folder}/tokenizer"
        create_graph_files(theirs, slug="graph", output_path=f"{folder}/theirs_json", **thresholds)
        save_file(tensors, f"{folder}/graphs.safetensors")
        with open(f"{folder}/graphs.json", "w") as f:
            json.dump(fields, f)


COMMANDS = {"read": read, "write": write, "graph": graphs, "frontend": frontend}


def batch(jobs: str) -> None:
    """Each [command, arguments...] of the JSON list in JOBS, in one start of this environment."""
    for command, *arguments in json.load(open(jobs)):
        COMMANDS[command](*arguments)


if __name__ == "__main__":
    {**COMMANDS, "batch": batch}[sys.argv[1]](*sys.argv[2:])
