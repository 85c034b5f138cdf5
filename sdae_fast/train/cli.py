"""``sdae-fast pretrain``: pretrain a ViT with MAE, SdAE, MixedAE or DINO.

With no ``--data`` it trains on the embedded digits (scikit-learn's ``load_digits``) and ends with
a table of k-NN and linear-probe accuracy of the trained encoder against a randomly initialised
one and the raw pixels, and a PNG of the loss curve and those numbers. ``--recipe paper`` (the
default with ``--data``) takes each method's official hyperparameters, ``--recipe demo`` (the
default without) the digits values; any option given explicitly overrides the recipe's. Launch with ``torchrun
--nproc_per_node N -m sdae_fast.cli pretrain ...`` for data-parallel training.
"""
from __future__ import annotations

import argparse
import os

from .demo_recipe import DEMO
from .recipes import RECIPES, apply_recipe

METHODS = ("mae", "sdae", "mixedae", "dino")
DEFAULT_LR = {method: values["lr"] for method, values in DEMO.items()}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--recipe", choices=RECIPES, default=None,
                   help="hyperparameters: 'paper' (the official ImageNet recipe; default with --data) or 'demo' "
                        "(the embedded digits; default without --data). Options given explicitly override it")
    p.add_argument("--size", default=None, help="model size (recipe: micro for demo, base / DINO small for paper)")
    p.add_argument("--data", default=None, help="image folder (class subfolders) or WebDataset tar shards (a .tar, "
                   "'train-{000000..000009}.tar', a folder of .tar); default: embedded digits")
    p.add_argument("--img-size", type=int, default=None, help="recipe: 32 demo, 224 paper")
    p.add_argument("--patch-size", type=int, default=None, help="recipe: 4 demo, 16 paper")
    p.add_argument("--holdout", type=float, default=0.2, help="held-out fraction for k-NN")
    p.add_argument("--epochs", type=int, default=None,
                   help="recipe: demo " + ", ".join(f"{m} {v['epochs']}" for m, v in DEMO.items())
                        + "; paper 800 MAE, 300 SdAE, 100 DINO")
    p.add_argument("--steps", type=int, default=None, help="total iterations (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="per process (recipe: 64 demo; paper per GPU)")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate, absolute (demo default, tuned on the micro digits: "
                        + ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items()) + "; paper: blr x batch / 256)")
    p.add_argument("--blr", type=float, default=None, help="base lr: lr = blr x global batch (x accum) / 256")
    p.add_argument("--min-lr", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None, help="demo: default 5%% of the steps")
    p.add_argument("--warmup-epochs", type=float, default=None, help="paper: the official warm-up epochs")
    p.add_argument("--lr-schedule", choices=["warmup_cosine", "mae", "dino"], default=None,
                   help="per-iteration schedule: the demo's, MAE's lr_sched formula, DINO's cosine_scheduler")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the method's (0.05 MAE/MixedAE, 0.04 SdAE/DINO)")
    p.add_argument("--weight-decay-end", type=float, default=None, help="cosine weight-decay target (DINO: 0.4)")
    p.add_argument("--betas", type=float, nargs=2, default=None, help="AdamW betas (default: the method's)")
    p.add_argument("--accum-iter", type=int, default=None,
                   help="gradient accumulation (paper default: to reach the official effective batch)")
    p.add_argument("--clip-grad", type=float, default=None, help="max global grad norm (off by default)")
    p.add_argument("--clip-per-param", type=float, default=None, help="DINO's per-parameter grad-norm clip (paper: 3.0)")
    p.add_argument("--freeze-last-layer", type=int, default=None, help="epochs without DINO last-layer updates (paper: 1)")
    p.add_argument("--out", default="runs/pretrain", help="output folder: checkpoints, metrics, encoder export")
    p.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps and at the end (0: never)")
    p.add_argument("--keep-ckpts", type=int, default=2, help="newest checkpoints to keep (0: all)")
    p.add_argument("--resume", default=None, help="checkpoint path, or 'auto' for the newest in --out that loads")
    p.add_argument("--backend", choices=["torch", "triton", "cuda"], default=None, help="default: automatic")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model, forward and backward (Triton kernels stay visible to Inductor); "
                        "optionally a torch.compile backend (default inductor)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--metrics", default=None, help="JSON-lines file (default: <out>/metrics.jsonl)")
    p.add_argument("--workers", "--num-workers", dest="workers", type=int, default=None,
                   help="DataLoader worker processes decoding and augmenting images (default: this process's "
                        "cores less one, at most 8; 0 decodes in the training process)")
    p.add_argument("--bad-images", choices=["skip", "error"], default="skip",
                   help="an undecodable image file: skip it (replaced by the next image, counted and named "
                        "in a warning) or stop with an error naming it")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 for --size micro on the CPU, whose tiny matmuls gain "
                        "nothing from threads and lose much to OpenMP spin-waits on a busy CPU; else torch's choice)")
    p.add_argument("--log-every", type=int, default=20,
                   help="print and read the step losses from the device every N steps (one sync; a NaN/inf "
                        "loss stops the run there, naming its step)")
    p.add_argument("--knn-k", type=int, default=20, help="k-NN neighbours of the final evaluation")
    p.add_argument("--knn-temperature", type=float, default=0.07, help="k-NN vote temperature (DINO's 0.07)")
    p.add_argument("--eval-pool", choices=("cls", "mean"), default="cls",
                   help="final evaluation features: the class token or the mean of the patch tokens")
    p.add_argument("--no-knn", "--no-eval", dest="knn", action="store_false",
                   help="skip the final evaluation (k-NN + linear probe vs random init and raw pixels)")
    p.add_argument("--no-export", dest="export", action="store_false", help="skip the timm encoder export")
    p.add_argument("--find-unused", action="store_true", help="DDP find_unused_parameters")
    p.add_argument("--quiet", action="store_true")
    # Model options for ``build(method, size, **model_kw)`` on top of the recipe's (library use, tests);
    # saved in checkpoints, so `sdae-fast eval` rebuilds the same model.
    p.set_defaults(model_kw=None)
    # Stop after this many steps as if preempted (the schedule still spans --steps): tests resume.
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill what the user left unset from the recipe (``--recipe``, or the default for ``--data``)."""
    apply_recipe(args)
    if args.data and os.path.exists(args.data):  # recorded in checkpoints: eval from another folder finds it
        args.data = os.path.abspath(args.data)
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
    """``pretrain`` of the recipe-filled ``args`` (model options in ``args.model_kw``: the recipe's,
    under any given ones); returns pretrain's summary dict."""
    from .loop import pretrain

    return pretrain(finalize_args(args))


def cmd_pretrain(args) -> int:
    chosen = args.recipe
    args = finalize_args(args)
    why = "as asked" if chosen else ("the default with --data" if args.data else "the default without --data")
    if not args.quiet:  # --quiet prints nothing
        print(f"recipe: {args.recipe} ({why})", flush=True)
    run_pretrain(args)
    return 0


def add_subcommand(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a ViT (MAE, SdAE, MixedAE, DINO); k-NN + linear-probe eval; timm export",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=cmd_pretrain)
