"""Frozen features of an encoder (or of the raw pixels) for the k-NN and linear-probe evaluations.

Works with this project's ``VisionTransformer`` and with timm's (an exported encoder loaded back):
both have ``forward_features(images) -> (B, 1 + N, D)`` after the final norm. ``pool="cls"`` takes
the class token, ``pool="mean"`` the mean of the patch tokens after the final norm (DINO's
``eval_linear.py --avgpool_patchtokens``; MAE's and timm's global pool instead take ``fc_norm`` of the
mean of the un-normed tokens, a different vector). An encoder without
``forward_features`` (a test stand-in) is read through its ``embed`` (CLS pooling only).
"""
from __future__ import annotations

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
    was_training = encoder.training
    encoder.eval()
    try:
        feats = [_pooled(encoder, images[i:i + batch_size].to(device), pool).float().cpu()
                 for i in range(0, len(images), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(feats)


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The baseline with no encoder: every image flattened to one vector (N, C·H·W), fp32."""
    return images.reshape(len(images), -1).float().cpu()


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
