"""``sdae-fast pretrain``: pretrain a ViT with MAE, SdAE, MixedAE or DINO.

With no ``--data`` it trains on the embedded digits (scikit-learn's ``load_digits``) and ends with
a table of k-NN and linear-probe accuracy of the trained encoder against a randomly initialised
one and the raw pixels, and a PNG of the loss curve and those numbers. Launch with ``torchrun
--nproc_per_node N -m sdae_fast.cli pretrain ...`` for data-parallel training.
"""
from __future__ import annotations

import argparse
import os

from .demo_recipe import DEMO, demo_model_kwargs

METHODS = ("mae", "sdae", "mixedae", "dino")
DEFAULT_LR = {method: values["lr"] for method, values in DEMO.items()}  # every DEMO entry has lr and epochs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--size", default="micro", help="model size (micro is the CPU-sized default)")
    p.add_argument("--data", default=None, help="image folder (class subfolders); default: embedded digits")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction for k-NN")
    p.add_argument("--epochs", type=int, default=None,
                   help="default: the demo recipe's (" + ", ".join(f"{m} {v['epochs']}" for m, v in DEMO.items()) + ")")
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, absolute (default, tuned on the micro digits demo: "
                        + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the method's (0.05 MAE/MixedAE, 0.04 SdAE/DINO)")
    p.add_argument("--clip-grad", type=float, default=None, help="max global grad norm (off by default)")
    p.add_argument("--out", default="runs/pretrain", help="output folder: checkpoints, metrics, encoder export")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps and at the end (0: never)")
    p.add_argument("--keep-ckpts", type=int, default=2, help="newest checkpoints to keep (0: all)")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the latest in --out")
    p.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None, help="default: automatic")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default=None, help="JSON-lines file (default: <out>/metrics.jsonl)")
    p.add_argument("--num-workers", type=int, default=0,
                   help="accepted for compatibility; data is held in memory, so batches need no workers")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for --size micro on the CPU, whose tiny matmuls gain "
                        "nothing from threads and lose much to OpenMP spin-waits on a busy CPU; else torch's choice)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours of the final evaluation")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="k-NN vote temperature (DINO's 0.07)")
    p.add_argument("--eval-pool", choices=("cls", "mean"), default="cls",
                   help="final evaluation features: the class token or the mean of the patch tokens")
    p.add_argument("--no-knn", "--no-eval", dest="knn", action="store_false",
                   help="skip the final evaluation (k-NN + linear probe vs random init and raw pixels)")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip the timm encoder export")
    p.add_argument("--find-unused", action="store_true", help="DDP find_unused_parameters")
    p.add_argument("--quiet", action="store_true")
    # Stop after this many steps as if preempted (the schedule still spans --steps): tests resume.
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    # Model options for ``build(method, size, **model_kwargs)``; None: the demo recipe's (finalize_args).
    p.set_defaults(model_kwargs=None)


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    for key, value in DEMO[args.method].items():  # the demo recipe fills what the command line left unset
        if key != "model" and getattr(args, key) is None:
            setattr(args, key, value)
    if getattr(args, "model_kwargs", None) is None:  # saved in checkpoints: `sdae-fast eval` rebuilds from it
        args.model_kwargs = demo_model_kwargs(args.method, args.size)
    if args.metrics is None:
        args.metrics = os.path.join(args.out, "metrics.jsonl")
    return args


def make_args(**overrides) -> argparse.Namespace:
    """The pretrain defaults with keyword overrides (underscored names), for library use and tests."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--method", overrides.pop("method", "sdae")])
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"unknown pretrain option {key!r}")
        setattr(args, key, value)
    return finalize_args(args)


def run_pretrain(args) -> dict:
    """``pretrain`` with the model options of ``args.model_kwargs`` (the demo recipe's for micro runs)."""
    import functools

    from .loop import default_build, pretrain

    args = finalize_args(args)
    return pretrain(args, build_fn=functools.partial(default_build, **args.model_kwargs))


def cmd_pretrain(args) -> int:
    run_pretrain(args)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a ViT (MAE, SdAE, MixedAE, DINO); k-NN + linear-probe eval; timm export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_pretrain)
