"""circuit-tracer 0.5.0's side of the graph benchmark (interpkernels.benchmarks.graphs).

Run by path with the interpreter of circuit-tracer's own environment
(setup_helpers/circuit-tracer-env.sh): it imports circuit_tracer, torch,
safetensors and transformers only, never interpkernels, so what it times is
circuit-tracer's code alone.

    python graphs_circuit_tracer.py FOLDER
        FOLDER as interpkernels.benchmarks.graphs writes it (config.json,
        model.safetensors, transcoders/, tokens.safetensors); prints one JSON
        line: attribute() and prune_graph() seconds, this process's peak RSS
        after both, and the graph's sizes.
"""

import json
import resource
import sys
import time

import torch
from safetensors.torch import load_file


def word_level_tokenizer(vocabulary_size: int, folder: str):
    """A tokenizer for the benchmark's vocabulary (token 0 is BOS), built here:
    ReplacementModel needs one and nothing may be downloaded."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocabulary = {"<bos>": 0, **{f"w{i}": i for i in range(1, vocabulary_size)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocabulary, unk_token="w1")),
                            bos_token="<bos>").save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


def measure(folder: str) -> dict:
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.utils.hf_utils import load_transcoder_from_hub
    from transformer_lens import HookedTransformerConfig

    config = json.loads(open(f"{folder}/config.json").read())
    torch.set_num_threads(config.pop("threads"))
    attribute_options, prune_options = config.pop("attribute"), config.pop("prune")
    config.pop("interpkernels", None)  # options of interpkernels' side only
    transcoders, _ = load_transcoder_from_hub(f"{folder}/transcoders", device=torch.device("cpu"),
                                              dtype=torch.float32, lazy_decoder=False)
    model = ReplacementModel.from_config(HookedTransformerConfig(**config, dtype=torch.float32, device="cpu"),
                                         transcoders, backend="transformerlens",
                                         tokenizer=word_level_tokenizer(config["d_vocab"], f"{folder}/tokenizer"))
    # The replacement model wraps each MLP (mlp.old_mlp) and the unembedding (unembed.old_unembed).
    parameters = {name.replace(".mlp.", ".mlp.old_mlp.").replace("unembed.", "unembed.old_unembed."): tensor
                  for name, tensor in load_file(f"{folder}/model.safetensors").items()}
    _, unexpected = model.load_state_dict(parameters, strict=False)
    assert not unexpected, unexpected
    tokens = load_file(f"{folder}/tokens.safetensors")["tokens"]

    start = time.perf_counter()
    graph = attribute(tokens, model, verbose=False, **attribute_options)
    attributed = time.perf_counter()
    pruned = prune_graph(graph, **prune_options)
    pruned_at = time.perf_counter()
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"attribute_s": attributed - start, "prune_s": pruned_at - attributed, "peak_rss_bytes": peak_rss_bytes,
            "features": int(graph.active_features.shape[0]), "rows": int(graph.selected_features.shape[0]),
            "edges": int(torch.count_nonzero(graph.adjacency_matrix)),
            "pruned_nodes": int(pruned.node_mask.sum()), "pruned_edges": int(pruned.edge_mask.sum())}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
