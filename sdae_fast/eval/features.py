"""Frozen features of an encoder (or of the raw pixels) for the k-NN and linear-probe evaluations.

Works with this project's ``VisionTransformer`` and with timm's (an exported encoder loaded back):
both have ``forward_features(images) -> (B, 1 + N, D)`` after the final norm. ``pool="cls"`` takes
the class token, ``pool="mean"`` the mean of the patch tokens after the final norm (DINO's
``eval_linear.py --avgpool_patchtokens``; MAE's and timm's global pool instead take ``fc_norm`` of the
mean of the un-normed tokens, a different vector). An encoder without
``forward_features`` (a test stand-in) is read through its ``embed`` (CLS pooling only).
"""
from __future__ import annotations

import contextlib
import math

import torch

POOLS = ("cls", "mean")


def _pooled(encoder, images: torch.Tensor, pool: str) -> torch.Tensor:
    if not hasattr(encoder, "forward_features"):
        if pool != "cls":
            raise ValueError(f"pool={pool!r} needs an encoder with forward_features; this one has only embed")
        return encoder.embed(images)
    tokens = encoder.forward_features(images)
    prefix = getattr(encoder, "num_prefix_tokens", 1)  # timm: cls (+ register) tokens first
    return tokens[:, 0] if pool == "cls" else tokens[:, prefix:].mean(1)


@torch.no_grad()
def encoder_features(encoder, images: torch.Tensor, pool: str = "cls", batch_size: int = 256,
                     device=None) -> torch.Tensor:
    """Pooled features (N, D), fp32 on the CPU, of ``images`` through ``encoder`` in eval mode
    (dropout and drop-path off), batched; not normalised (each evaluation normalises as it needs)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    device = device or next(encoder.parameters()).device
    with _in_eval_mode([encoder]):
        feats = [_pooled(encoder, images[i:i + batch_size].to(device), pool).float().cpu()
                 for i in range(0, len(images), batch_size)]
    return torch.cat(feats)


@contextlib.contextmanager
def _in_eval_mode(encoders):
    """Dropout and drop-path off while reading features; each encoder's own mode back after."""
    modes = [(enc, enc.training) for enc in encoders if enc is not None]
    try:
        for enc, _ in modes:
            enc.eval()
        yield
    finally:
        for enc, mode in modes:
            enc.train(mode)


PIXEL_VALUES = 1024  # the raw-pixel baseline's size: the grey 32 px digits as they are; RGB 18 x 18


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The baseline with no encoder: every image flattened to one vector, fp32. Images of more than
    :data:`PIXEL_VALUES` values are area-averaged first, to the largest square side that fits
    (224 px RGB: 18 x 18 x 3 = 972 values): held for every image of a split, a 224 px vector would
    take 600 KB an image (ImageNet: 600 GB), and k-NN on tiny images is the classic baseline."""
    _, c, h, w = images.shape
    side = math.isqrt(PIXEL_VALUES // max(c, 1))
    if c * h * w > PIXEL_VALUES and side >= 1:
        images = torch.nn.functional.adaptive_avg_pool2d(images.float(), (min(h, side), min(w, side)))
    return images.reshape(len(images), -1).float().cpu()


@torch.no_grad()
def source_features(encoders: dict, source, img_size: int, *, pool: str = "cls", device=None, workers=None,
                    bad_images: str = "error", batch_size: int = 256) -> tuple[dict, torch.Tensor]:
    """``({row: (N, D) fp32 CPU features}, labels (N,))`` of every image of ``source``, un-augmented,
    in one streamed pass (``sdae_fast.data.eval_loader``): only the features are held, never the
    images, so memory grows with N·D, not with the folder's pixels. ``encoders``: ``row -> encoder``,
    ``None`` for the raw pixels. Undecodable images skipped under ``bad_images="skip"`` are warned
    about, counted and named (``sdae_fast.data.splits.eval_batches``)."""
    from ..data.splits import eval_batches

    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    feats, labels = {row: [] for row in encoders}, []
    with _in_eval_mode(encoders.values()):
        for batch in eval_batches(source, img_size, batch_size, workers, bad_images):
            images = batch["images"]
            for row, enc in encoders.items():
                if enc is None:
                    feats[row].append(pixel_features(images))
                else:
                    dev = device or next(enc.parameters()).device
                    feats[row].append(_pooled(enc, images.to(dev), pool).float().cpu())
            labels.append(batch["labels"])
    if not labels:
        return {row: torch.empty(0, 0) for row in encoders}, torch.empty(0, dtype=torch.long)
    return {row: torch.cat(f) for row, f in feats.items()}, torch.cat(labels)


def check_finite(feats: torch.Tensor, split: str, evaluation: str) -> None:
    """``ValueError`` when ``feats`` (N, D) hold NaN or inf, naming ``split`` ("train" / "test"), which
    of the two and in how many rows; a NaN would otherwise win k-NN's top-k and argmax, and scikit-learn
    stops on it with its imputer advice. One host sync: evaluation is not a hot path."""
    if not feats.is_floating_point():
        return
    flat = feats.flatten(1) if feats.dim() > 1 else feats[:, None]  # (N, D); N = 0 passes
    nan_rows, inf_rows = flat.isnan().any(1), flat.isinf().any(1)
    bad = int((nan_rows | inf_rows).sum())
    if bad:
        kinds = " and ".join(kind for kind, rows in (("NaN", nan_rows), ("inf", inf_rows)) if rows.any())
        raise ValueError(f"{evaluation}: the {split} features contain {kinds} in {bad} of {len(feats)} rows; "
                         f"the encoder probably diverged (see the training loss; lower --lr or set --clip-grad)")
