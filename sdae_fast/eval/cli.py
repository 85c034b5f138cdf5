"""``sdae-fast eval``: k-NN and linear probe of a checkpoint or an exported encoder, next to the same
architecture at random init and the raw pixels.

The data defaults to the run's own (``--data`` and ``--holdout`` as it was pretrained; the embedded
digits when it had none); give ``--data DIR`` to evaluate on another image folder.
"""
from __future__ import annotations

import argparse
import json


def add_subcommand(sub) -> None:
    p = sub.add_parser("eval", help="k-NN + linear probe of a checkpoint or exported encoder vs random init "
                       "and raw pixels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="pretrain checkpoint (.pt), or an exported encoder: encoder.pt or its folder")
    p.add_argument("--data", default=None, help="image folder (class subfolders) or WebDataset shards; default: the run's data")
    p.add_argument("--holdout", type=float, default=None, help="held-out fraction (default: the run's, else 0.2)")
    p.add_argument("--bad-images", choices=["skip", "error"], default=None,
                   help="an unreadable image: skip it (counted, named) or stop (default: the run's setting, else error)")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.07)
    p.add_argument("--pool", choices=("cls", "mean"), default="cls",
                   help="features: the class token or the mean of the patch tokens")
    p.add_argument("--no-linear", dest="linear", action="store_false", help="k-NN only")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: as pretraining, 1 for a micro run on the CPU)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import torch

    from ..data import open_sources
    from ..threads import apply_cpu_threads
    from .load import load_encoder
    from .report import evaluate_sources, flat, format_table

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = load_encoder(args.checkpoint)
    apply_cpu_threads(args.threads, loaded.run_args.get("size"), device)
    data = args.data if args.data is not None else loaded.run_args.get("data")
    holdout = args.holdout if args.holdout is not None else loaded.run_args.get("holdout", 0.2)
    bad_images = args.bad_images or loaded.run_args.get("bad_images", "error")
    train_src, held_src = open_sources(data, loaded.img_size, holdout)
    if len(held_src) == 0:
        raise ValueError(f"no held-out images to evaluate on (--holdout {holdout}): give --holdout > 0")
    if train_src.in_chans != loaded.in_chans:
        raise ValueError(f"the encoder takes {loaded.in_chans}-channel images but {train_src.name} has "
                         f"{train_src.in_chans} channels")
    with torch.random.fork_rng(devices=[]):
        fresh = loaded.make_random()
    encoders = {"pretrained": loaded.encoder.to(device), "random init": fresh.to(device), "raw pixels": None}
    # Streamed through DataLoader workers: the features are held, never the images.
    results = evaluate_sources(encoders, train_src, held_src, loaded.img_size, k=args.knn_k,
                               temperature=args.knn_temperature, pool=args.pool, linear=args.linear, device=device,
                               bad_images=bad_images)
    print(f"{loaded.kind} {args.checkpoint}")
    print(format_table(results, args.knn_k, args.knn_temperature, args.pool, len(held_src), train_src.name))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(flat(results), f, indent=2)
    return 0
