"""Command line: `python -m interpkernels {demo,bench,info,train-distributed}`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import interpkernels


def bench(args: argparse.Namespace) -> None:
    from interpkernels.benchmarks import OPS
    from interpkernels.benchmarks.harness import format_table, machine_description, run_cases, write_csv

    device = torch.device(args.device)
    ops = args.ops or list(OPS)
    unknown = set(ops) - set(OPS)
    if unknown:
        raise SystemExit(f"--ops: unknown op(s) {sorted(unknown)}; choose from {sorted(OPS)}")
    # On a GPU, the modules that define them run their SPEC section 7 shapes and GPU baselines.
    case_lists = [getattr(OPS[op], "gpu_cases", OPS[op].cases) if device.type == "cuda" else OPS[op].cases
                  for op in ops]
    cases = [case for make_cases in case_lists for case in make_cases(quick=args.quick)]
    repeats = args.repeats or (3 if args.quick else 7)
    print(f"interpkernels {interpkernels.__version__} benchmarks on {machine_description(device)}, "
          f"torch {torch.__version__}, {repeats} repeats", file=sys.stderr)
    measurements = run_cases(cases, device, repeats, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(measurements))
    if args.csv:
        write_csv(measurements, Path(args.csv), device)
        print(f"results written to {args.csv}", file=sys.stderr)
        if args.plots:
            from interpkernels.benchmarks.plots import write_plots

            for path in write_plots(measurements, Path(args.csv).parent, Path(args.csv).stem):
                print(f"figure written to {path}", file=sys.stderr)


def info(args: argparse.Namespace) -> None:
    print(json.dumps(interpkernels.build_info(), indent=2))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["demo"]:  # the demo parses its own flags
        from interpkernels import demo

        demo.main(argv[1:])
        return
    if argv[:1] == ["train-distributed"]:  # run under torchrun; parses its own flags
        from interpkernels.distributed import launch

        launch.main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="python -m interpkernels", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="train a TopK SAE on synthetic data with known features (--help for flags)")
    bench_parser = commands.add_parser("bench", help="time every op against its baselines and print the table")
    bench_parser.add_argument("--ops", nargs="+", help="ops to run (default: all)")
    bench_parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    bench_parser.add_argument("--quick", action="store_true", help="small shapes, a smoke run of a few seconds")
    bench_parser.add_argument("--repeats", type=int, help="timed repeats per implementation (default 7, quick 3)")
    bench_parser.add_argument("--csv", help="also write the results, with machine, torch, commit and date, here")
    bench_parser.add_argument("--plots", action="store_true",
                              help="with --csv, also draw time against each swept M, k or d beside it (matplotlib)")
    bench_parser.set_defaults(run=bench)
    commands.add_parser("info", help="print how this copy was built").set_defaults(run=info)
    commands.add_parser("train-distributed", help="train an SAE under torchrun, data-parallel x latent-sharded "
                        "(--help for flags)")
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
