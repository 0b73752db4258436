"""Attribution graphs against prompt length: interpkernels.graphs and circuit-tracer 0.5.0.

    python -m interpkernels.benchmarks.graphs --tokens 32 64 128
    python -m interpkernels.benchmarks.graphs --tokens 1024 --max-feature-nodes 8192 --memory-limit-gib 20

Issue 17's setup by default: a GPT-2-style model (4 layers, d=128), random
per-layer JumpReLU transcoders with 2048 latents whose thresholds let about 32
latents per token per layer fire, batch 64, attribute then prune at
(0.8, 0.98); --max-feature-nodes limits the rows (both tools, circuit-tracer's
influence-ordered choice), --edge-mass prunes our rows as they are computed
(ours only). One random model and one random prompt (the first n tokens of
it for each length) serve both tools. Every measurement runs in a fresh
subprocess, one thread, so its peak RSS (``ru_maxrss``, which includes the
interpreter, torch and the model) is that graph's alone; circuit-tracer runs
in its own environment (graphs_circuit_tracer.py) under an address-space
limit. Writes a CSV (with the load average before each run: the machine may
be shared) and a figure of time and peak RSS against tokens.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

TOOLS = ("interpkernels", "circuit-tracer")
CIRCUIT_TRACER_SIDE = Path(__file__).with_name("graphs_circuit_tracer.py")
GIB = 2**30
FIELDS = ["tool", "tokens", "status", "attribute_s", "prune_s", "total_s", "peak_rss_gib", "features", "rows",
          "edges", "pruned_nodes", "pruned_edges", "load_average_1min", "threads", "layers", "d_model", "latents",
          "active_per_token", "batch_size", "max_feature_nodes", "edge_mass"]


def write_case(folder: Path, *, layers: int, d_model: int, latents: int, active: int, max_tokens: int,
               batch_size: int, threads: int, max_feature_nodes: int | None = None, edge_mass: float = 1.0,
               seed: int = 0) -> None:
    """A random GPT-2-style model and random JumpReLU transcoders in the files
    both tools read. Each layer's thresholds are one value: the quantile of its
    pre-activations on the prompt at which `active` of `latents` fire per token."""
    import transformer_lens
    from safetensors.torch import save_file

    from interpkernels.graphs import TranscoderSet, save_transcoders
    from interpkernels.nn import JumpReLUTranscoder

    config = dict(n_layers=layers, d_model=d_model, n_ctx=max_tokens, d_head=32, n_heads=d_model // 32,
                  d_mlp=4 * d_model, d_vocab=1024, act_fn="gelu_new", normalization_type="LN",
                  positional_embedding_type="standard", seed=seed)
    torch.manual_seed(seed)
    model = transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(**config, device="cpu"))
    tokens = torch.cat([torch.zeros(1, dtype=torch.int64), torch.randint(1, config["d_vocab"], (max_tokens - 1,))])
    names = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens[None], names_filter=names)
        transcoders = []
        for layer in range(layers):
            transcoder = JumpReLUTranscoder(d_model, latents, latents, seed=layer)
            transcoder.W_enc.copy_(torch.randn(latents, d_model) / d_model**0.5)
            transcoder.W_dec.copy_(torch.randn(latents, d_model) / active**0.5)
            transcoder.b_enc.zero_()
            transcoder.b_dec.zero_()
            pre_activations = cache[names[layer]][0, 1:] @ transcoder.W_enc.T
            transcoder.threshold.fill_(torch.quantile(pre_activations.flatten(), 1 - active / latents).item())
            transcoders.append(transcoder)
    folder.mkdir(parents=True, exist_ok=True)
    save_transcoders(TranscoderSet(transcoders), folder / "transcoders")
    save_file({name: p.detach().contiguous() for name, p in model.named_parameters()}, folder / "model.safetensors")
    save_file({"tokens": tokens}, folder / "all_tokens.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {**config, "threads": threads,
         "attribute": dict(max_n_logits=10, desired_logit_prob=0.95, batch_size=batch_size,
                           max_feature_nodes=max_feature_nodes),
         "interpkernels": dict(edge_mass=edge_mass), "prune": dict(node_threshold=0.8, edge_threshold=0.98)}))


def prompt_folder(case: Path, n_tokens: int) -> Path:
    """A folder holding the case's files (linked) and the first n_tokens of its prompt."""
    from safetensors.torch import load_file, save_file

    folder = case / f"tokens{n_tokens}"
    folder.mkdir(exist_ok=True)
    for name in ("transcoders", "model.safetensors", "config.json"):
        if not (folder / name).exists():
            (folder / name).symlink_to(case / name)
    save_file({"tokens": load_file(case / "all_tokens.safetensors")["tokens"][:n_tokens].contiguous()},
              folder / "tokens.safetensors")
    return folder


def measure_interpkernels(folder: str) -> dict:
    """interpkernels' side, in its own subprocess (`--measure FOLDER`): what graphs_circuit_tracer.py measures."""
    import transformer_lens
    from safetensors.torch import load_file

    from interpkernels.graphs import attribution_graph, load_transcoders

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    torch.set_num_threads(config.pop("threads"))
    attribute_options, prune_options = config.pop("attribute"), config.pop("prune")
    attribute_options |= config.pop("interpkernels")
    model = transformer_lens.HookedTransformer(transformer_lens.HookedTransformerConfig(**config, device="cpu"))
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=False)
    transcoders = load_transcoders(folder / "transcoders")
    tokens = load_file(folder / "tokens.safetensors")["tokens"]

    start = time.perf_counter()
    graph = attribution_graph(model, transcoders, tokens, **attribute_options)
    attributed = time.perf_counter()
    pruned = graph.prune(**prune_options)
    pruned_at = time.perf_counter()
    peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"attribute_s": attributed - start, "prune_s": pruned_at - attributed, "peak_rss_bytes": peak_rss_bytes,
            "features": graph.active_features.shape[0], "rows": graph.n_features,
            "edges": int(torch.count_nonzero(graph.adjacency.values())),
            "pruned_nodes": int(pruned.node_mask.sum()), "pruned_edges": int(pruned.edges._nnz())}


def run_one(tool: str, folder: Path, circuit_tracer_python: Path, time_limit_s: float,
            memory_limit_gib: float | None) -> dict:
    """One measurement in a fresh subprocess: its JSON, or {"status": why none came back}."""
    if tool == "interpkernels":
        command = [sys.executable, "-m", "interpkernels.benchmarks.graphs", "--measure", str(folder)]
        environment = dict(os.environ)
    else:
        command = [str(circuit_tracer_python), str(CIRCUIT_TRACER_SIDE), str(folder)]
        # Its environment has its own packages; ours must not leak in.
        environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        environment["HF_HUB_OFFLINE"] = "1"
    environment["OMP_NUM_THREADS"] = str(json.loads((folder / "config.json").read_text())["threads"])

    def limit_memory():
        if memory_limit_gib is not None:
            limit = int(memory_limit_gib * GIB)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # Reaped with wait4 for the child's own rusage: a run that fails still tells its peak RSS.
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=environment,
                                   preexec_fn=limit_memory)
        timed_out = threading.Event()

        def stop():
            timed_out.set()
            process.kill()

        timer = threading.Timer(time_limit_s, stop)
        timer.start()
        _, wait_status, usage = os.wait4(process.pid, 0)
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(wait_status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()
    peak_when_failed = {"peak_rss_bytes": usage.ru_maxrss * 1024}
    if timed_out.is_set():
        return {"status": f"over the {time_limit_s:g} s limit", **peak_when_failed}
    if process.returncode != 0:
        out_of_memory = any(sign in errors for sign in ("MemoryError", "DefaultCPUAllocator", "out of memory"))
        limit = f"over the {memory_limit_gib:g} GiB address-space limit" if out_of_memory else None
        return {"status": limit or f"failed (exit {process.returncode}): {errors.strip().splitlines()[-1:]}",
                **peak_when_failed}
    # Its own figure, read right after pruning: the sizes counted afterwards do not add to it.
    return {"status": "ok", **json.loads(output.strip().splitlines()[-1])}


def run(tokens: list[int], tools: list[str], *, layers: int, d_model: int, latents: int, active: int,
        batch_size: int, threads: int, max_feature_nodes: int | None, edge_mass: float,
        circuit_tracer_python: Path, circuit_tracer_max_tokens: int | None, time_limit_s: float,
        memory_limit_gib: float | None, log=lambda rows: print(format_row(rows[-1]))) -> list[dict]:
    """One row per (tokens, tool), lengths in order and the tools interleaved at each;
    log(rows so far) after each."""
    shape = dict(layers=layers, d_model=d_model, latents=latents, active_per_token=active, batch_size=batch_size,
                 max_feature_nodes=max_feature_nodes)
    rows = []
    with tempfile.TemporaryDirectory(prefix="graph-bench-") as directory:
        case = Path(directory)
        write_case(case, layers=layers, d_model=d_model, latents=latents, active=active, max_tokens=max(tokens),
                   batch_size=batch_size, threads=threads, max_feature_nodes=max_feature_nodes, edge_mass=edge_mass)
        for n_tokens in tokens:
            folder = prompt_folder(case, n_tokens)
            for tool in tools:
                if tool == "circuit-tracer" and circuit_tracer_max_tokens is not None \
                        and n_tokens > circuit_tracer_max_tokens:
                    result = {"status": f"not run: past --circuit-tracer-max-tokens {circuit_tracer_max_tokens}"}
                    load = None
                else:
                    load = os.getloadavg()[0]
                    result = run_one(tool, folder, circuit_tracer_python, time_limit_s, memory_limit_gib)
                row = {"tool": tool, "tokens": n_tokens, "load_average_1min": load, "threads": threads, **shape,
                       "edge_mass": edge_mass if tool == "interpkernels" else None,
                       **{key: value for key, value in result.items() if key != "peak_rss_bytes"}}
                if "peak_rss_bytes" in result:
                    row["peak_rss_gib"] = result["peak_rss_bytes"] / GIB
                if result["status"] == "ok":
                    row["total_s"] = result["attribute_s"] + result["prune_s"]
                rows.append(row)
                log(rows)
    return rows


def format_row(row: dict) -> str:
    if row["status"] != "ok":
        peak = f" (peak RSS {row['peak_rss_gib']:.2f} GiB)" if "peak_rss_gib" in row else ""
        return f"{row['tool']:>15} {row['tokens']:>6} tokens: {row['status']}{peak}"
    return (f"{row['tool']:>15} {row['tokens']:>6} tokens: attribute {row['attribute_s']:8.2f} s, prune "
            f"{row['prune_s']:7.2f} s, peak RSS {row['peak_rss_gib']:6.2f} GiB, {row['features']} features, "
            f"{row.get('rows')} rows, "
            f"{row['edges']} edges, pruned to {row['pruned_nodes']} nodes (load {row['load_average_1min']:.2f})")


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: f"{value:.4g}" if isinstance(value, float) else value for key, value in row.items()})


def write_plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels against tokens (log-log): attribute + prune time, and peak RSS with the issue's 1.5 GiB goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for tool in TOOLS:
        measured = [row for row in rows if row["tool"] == tool and row["status"] == "ok"]
        if not measured:
            continue
        tokens = [row["tokens"] for row in measured]
        time_axes.plot(tokens, [row["total_s"] for row in measured], marker="o", label=tool)
        memory_axes.plot(tokens, [row["peak_rss_gib"] for row in measured], marker="o", label=tool)
    memory_axes.axhline(1.5, color="grey", linestyle="--", linewidth=1, label="goal at 128 tokens: 1.5 GiB")
    for axes, label in ((time_axes, "attribute + prune (s)"), (memory_axes, "peak RSS of the process (GiB)")):
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel("prompt tokens")
        axes.set_ylabel(label)
        axes.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict] | None:
    parser = argparse.ArgumentParser(prog="python -m interpkernels.benchmarks.graphs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32, 64, 128])
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--latents", type=int, default=2048)
    parser.add_argument("--active", type=int, default=32, help="latents firing per token per layer")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-feature-nodes", type=int, default=None,
                        help="feature rows computed (both tools; circuit-tracer's influence-ordered choice)")
    parser.add_argument("--edge-mass", type=float, default=1.0,
                        help="interpkernels only: share of each row's absolute mass its kept edges hold (1: exact)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--circuit-tracer-python", type=Path,
                        default=Path(os.environ.get("INTERPKERNELS_CIRCUIT_TRACER_VENV", ".venv-circuit-tracer"))
                        / "bin" / "python")
    parser.add_argument("--circuit-tracer-max-tokens", type=int, default=None,
                        help="longer prompts are not given to circuit-tracer (recorded as not run)")
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds per measurement")
    parser.add_argument("--memory-limit-gib", type=float, default=16.0,
                        help="each run's address-space limit (RLIMIT_AS): past it a run fails and is recorded "
                             "as such, instead of taking the machine's memory")
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--measure", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure_interpkernels(args.measure)))
        return None
    if "circuit-tracer" in args.tools and not args.circuit_tracer_python.is_file():
        parser.error(f"--circuit-tracer-python: no interpreter at {args.circuit_tracer_python} "
                     "(bash setup_helpers/circuit-tracer-env.sh builds one), or pass --tools interpkernels")
    stamp = datetime.date.today().isoformat()
    csv_path = args.csv or Path("bench/results") / f"{platform.machine()}-graphs-{stamp}.csv"

    def record(rows_so_far):
        # Rewritten after every run, so an interrupted sweep keeps what it measured.
        print(format_row(rows_so_far[-1]), flush=True)
        write_csv(rows_so_far, csv_path)

    rows = run(sorted(args.tokens), args.tools, layers=args.layers, d_model=args.d_model, latents=args.latents,
               active=args.active, batch_size=args.batch_size, threads=args.threads,
               max_feature_nodes=args.max_feature_nodes, edge_mass=args.edge_mass,
               circuit_tracer_python=args.circuit_tracer_python.absolute(),
               circuit_tracer_max_tokens=args.circuit_tracer_max_tokens, time_limit_s=args.time_limit,
               memory_limit_gib=args.memory_limit_gib, log=record)
    print(f"wrote {csv_path}")
    if args.plot:
        write_plot(rows, args.plot, f"attribution graph + prune, {args.layers} layers, d={args.d_model}, "
                                    f"{args.latents}-latent JumpReLU transcoders (~{args.active} active per token), "
                                    f"batch {args.batch_size}, {args.threads} thread(s)")
        print(f"wrote {args.plot}")
    return rows


if __name__ == "__main__":
    main()
