"""The evaluation table: k-NN and linear probe for the pretrained encoder, the same architecture at
random init, and the raw pixels, so a reader sees at a glance whether pretraining helped.

``evaluate`` computes it; ``format_table`` prints it; ``pretrain_report`` is what the end of
``sdae-fast pretrain`` runs (table, results dict, and the PNG of loss curve + bars in the run folder).
"""
from __future__ import annotations

import importlib.util
import json
import os

import torch

from .features import encoder_features, pixel_features, source_features
from .knn import knn_accuracy
from .linear_probe import linear_probe_accuracy

ROWS = ("pretrained", "random init", "raw pixels")
KEYS = {"pretrained": "trained", "random init": "random_init", "raw pixels": "raw_pixels"}


def evaluate(encoders: dict, splits, k: int = 20, temperature: float = 0.07, pool: str = "cls",
             linear: bool = True, device=None) -> dict:
    """``{row: {"knn": acc, "linear": acc or None}}`` for every ``row -> encoder`` of ``encoders``;
    an encoder of ``None`` means the raw pixels. ``splits`` is an ``ImageSplits``-like object
    (train/held-out images and labels, ``classes``) held in memory; :func:`evaluate_sources`
    streams a dataset of any size instead."""
    def features(images):
        return {row: pixel_features(images) if enc is None else encoder_features(enc, images, pool=pool, device=device)
                for row, enc in encoders.items()}

    return evaluate_features(features(splits.train_images), splits.train_labels, features(splits.heldout_images),
                             splits.heldout_labels, len(splits.classes), k=k, temperature=temperature, linear=linear)


def evaluate_sources(encoders: dict, train_src, held_src, img_size: int, k: int = 20, temperature: float = 0.07,
                     pool: str = "cls", linear: bool = True, device=None, workers=None,
                     bad_images: str = "error") -> dict:
    """:func:`evaluate` on two data sources (``sdae_fast.data.open_sources``), streamed through
    DataLoader workers in one pass per split: memory holds the features (N × D per row), never the
    images (the raw pixels' row: see :func:`~sdae_fast.eval.features.pixel_features`)."""
    kw = dict(pool=pool, device=device, workers=workers, bad_images=bad_images)
    train, train_labels = source_features(encoders, train_src, img_size, **kw)
    test, test_labels = source_features(encoders, held_src, img_size, **kw)
    return evaluate_features(train, train_labels, test, test_labels, len(train_src.classes), k=k,
                             temperature=temperature, linear=linear)


def evaluate_features(train: dict, train_labels, test: dict, test_labels, num_classes: int, k: int = 20,
                      temperature: float = 0.07, linear: bool = True) -> dict:
    """The table's numbers from ``{row: features}`` of the train and held-out splits."""
    results = {}
    for row in train:
        knn = knn_accuracy(train[row], train_labels, test[row], test_labels, k=k, temperature=temperature,
                           num_classes=num_classes)
        probe = linear_probe_accuracy(train[row], train_labels, test[row], test_labels) if linear else None
        results[row] = {"knn": knn, "linear": probe}
    return results


def flat(results: dict) -> dict:
    """``{"knn_trained": ..., "linear_random_init": ..., ...}`` for logs and JSON."""
    out = {}
    for row, accs in results.items():
        for metric, value in accs.items():
            if value is not None:
                out[f"{metric}_{KEYS.get(row, row.replace(' ', '_'))}"] = value
    return out


def format_table(results: dict, k: int, temperature: float, pool: str, heldout: int, dataset: str) -> str:
    """A fixed-width table, one row per encoder, the gain over random init beside the pretrained row."""
    base = results.get("random init")
    lines = [f"evaluation on {heldout} held-out {dataset} images ({pool} features; k-NN k={k}, T={temperature:g}; "
             "linear probe: logistic regression, C by 3-fold CV)",
             f"  {'':<12} {'k-NN':>7} {'linear':>7}"]
    for row, accs in results.items():
        cells = [f"{accs[m]:7.3f}" if accs.get(m) is not None else f"{'-':>7}" for m in ("knn", "linear")]
        gain = ""
        if row == "pretrained" and base:
            gain = "   vs random init: " + ", ".join(
                f"{m} {100 * (accs[m] - base[m]):+.1f} pts" for m in ("knn", "linear")
                if accs.get(m) is not None and base.get(m) is not None)
        lines.append(f"  {row:<12} {' '.join(cells)}{gain}")
    return "\n".join(lines)


def pretrain_report(encoder, make_random_encoder, args, sources, losses, device, say, first_step: int = 1,
                    workers=None) -> dict:
    """End of pretraining: evaluate ``encoder``, a fresh one from ``make_random_encoder()`` (built
    from the run's seed without touching the global RNG) and the raw pixels on the (train,
    held-out) ``sources``, streamed; print the table and write ``<out>/eval.json`` and
    ``<out>/pretrain.png``. Returns the flat results (see :func:`flat`)."""
    with torch.random.fork_rng(devices=[]):
        fresh = make_random_encoder().to(device)
    k, temperature = args.knn_k, getattr(args, "knn_temperature", 0.07)
    pool = getattr(args, "eval_pool", "cls")
    train_src, held_src = sources
    results = evaluate_sources({"pretrained": encoder, "random init": fresh, "raw pixels": None}, train_src, held_src,
                               args.img_size, k=k, temperature=temperature, pool=pool, device=device, workers=workers,
                               bad_images=args.bad_images)
    say(format_table(results, k, temperature, pool, len(held_src), held_src.name))
    out = flat(results)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump({"k": k, "temperature": temperature, "pool": pool, **out}, f, indent=2)
        if importlib.util.find_spec("matplotlib") is None:  # optional (the data extra): numbers suffice
            say("plot skipped: matplotlib is not installed (pip install 'sdae_fast[data]')")
            return out
        from ..plots import pretrain_figure

        path = pretrain_figure(losses, results, os.path.join(args.out, "pretrain.png"),
                               title=f"{args.method} ({args.size}) on {train_src.name}", first_step=first_step)
        say(f"plot: {path}")
    return out
