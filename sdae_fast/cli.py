"""The ``sdae-fast`` command: ``info``, ``bench``, ``pretrain`` and ``eval``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def cmd_info(args) -> int:
    import torch

    from . import OPS, __version__, dispatch

    print(f"sdae_fast {__version__}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')})")
    except ImportError:
        print("triton: not installed")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu (no CUDA device)'}")
    print(f"{dispatch.ENV_VAR}={os.environ.get(dispatch.ENV_VAR, '(unset: automatic)')}")
    from . import cuda_build

    print(f"CUDA extension: {cuda_build.status()}")
    if getattr(args, "kernels", False):
        from .kernel_table import print_table

        print()
        return print_table(full=args.full)
    print()
    from .bench.samples import sample_inputs

    with cuda_build.without_jit_build():  # describe the backends; building the extension is for a first op
        for name, op in OPS.items():
            args_, kwargs = sample_inputs(name, device)
            chosen = op.select(None, *args_, **kwargs).backend
            print(f"{name}: automatic -> {chosen}")
            for backend, why in op.describe(*args_, **kwargs).items():
                print(f"    {backend:<7} {why}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = args.out
    if out is None and device == "cuda":
        out = "benchmarks/results"
    only = args.ops.split(",") if args.ops else None
    if args.time_budget is not None and not args.time_budget > 0:
        raise SystemExit(f"sdae-fast bench: --time-budget must be > 0 seconds, got {args.time_budget}")
    report.run(device, quick=args.quick or device == "cpu", only=only, out_dir=out, reps=args.reps,
               time_budget=args.time_budget)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, device, and which backend serves each op")
    p.add_argument("--kernels", action="store_true",
                   help="compile every Triton kernel variant for sm_90 offline and print registers, spills, MMA kind")
    p.add_argument("--full", action="store_true", help="with --kernels: every variant, not the CI subset")
    p.set_defaults(func=cmd_info)
    from .bench import harness  # the case groups, for --help (registering them imports no kernel)

    p = sub.add_parser("bench", help="fused vs naive vs alternatives; markdown + JSON report")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None)
    p.add_argument("--ops", default=None, help="comma-separated substrings of case groups to run: "
                   + ", ".join(harness.group_names()))
    p.add_argument("--quick", action="store_true", help="small shapes (always on for the CPU)")
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="start no case after this many seconds; the rest are listed as not run "
                        "(default: $SDAE_FAST_BENCH_BUDGET, else none)")
    p.add_argument("--out", default=None, help="directory for the report (default on CUDA: benchmarks/results)")
    p.set_defaults(func=cmd_bench)
    # Later subcommands (pretrain, eval) register themselves from their own modules.
    for module in ("sdae_fast.train.cli", "sdae_fast.eval.cli"):
        try:
            importlib.import_module(module).add_subcommand(sub)
        except ModuleNotFoundError as exc:
            if exc.name not in (module, module.rsplit(".", 1)[0]):
                raise
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
