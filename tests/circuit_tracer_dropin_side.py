"""The drop-in's side of tests/test_graphs_dropin.py, run in circuit-tracer's
environment where both circuit_tracer and interpkernels import (the
interpkernels under test: tests/circuit_tracer_env.py links it in).

    python circuit_tracer_dropin_side.py FOLDER...
        For each FOLDER (as circuit_tracer_side.py's graph command reads it;
        config.json's "dropin" holds the "prompt", a text or a list of ids,
        "lazy_decoder" and "text_prompts"): one ReplacementModel, on which
        interpkernels.integrations.circuit_tracer.attribute runs first and
        circuit-tracer's attribute second, with config.json's "attribute"
        keywords. FOLDER/graphs.safetensors and FOLDER/graphs.json get both
        Graphs' fields ("ours", "theirs") with their prune_graph (config.json's
        "prune") and compute_graph_scores on each; create_graph_files writes
        each Graph to FOLDER/ours_json and FOLDER/theirs_json.
"""

import json
import sys

from circuit_tracer_side import graph_fields, pruned_fields, replacement_model
from safetensors.torch import save_file


def dropin(*folders: str) -> None:
    import circuit_tracer
    from circuit_tracer.utils.create_graph_files import create_graph_files

    from interpkernels.integrations import circuit_tracer as interpkernels_circuit_tracer

    for folder in folders:
        settings = json.loads(open(f"{folder}/config.json").read())["dropin"]
        model, options = replacement_model(folder, lazy_decoder=settings["lazy_decoder"],
                                           text_prompts=settings["text_prompts"])
        # Ours first: anything it left on the model would show in theirs.
        graphs = {"ours": interpkernels_circuit_tracer.attribute(settings["prompt"], model, **options["attribute"]),
                  "theirs": circuit_tracer.attribute(settings["prompt"], model, **options["attribute"])}
        tensors, fields = {}, {}
        for name, graph in graphs.items():
            graph_tensors, fields[name] = graph_fields(graph, name)
            tensors |= graph_tensors
            tensors |= {f"{name}.{key}": value for key, value in pruned_fields(graph, options["prune"]).items()}
            # A model built from a config names no tokenizer; create_graph_files loads it by this name.
            graph.cfg.tokenizer_name = f"{folder}/tokenizer"
            create_graph_files(graph, slug="graph", output_path=f"{folder}/{name}_json", **options["frontend"])
        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, f"{folder}/graphs.safetensors")
        with open(f"{folder}/graphs.json", "w") as f:
            json.dump(fields, f)


if __name__ == "__main__":
    dropin(*sys.argv[1:])
