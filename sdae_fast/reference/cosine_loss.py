"""SdAE's cosine loss on standardised teacher features (SPEC §4)."""
import torch

from .stats import accumulation_dtype, standardize

COS_EPS = 1e-8  # F.cosine_similarity's default: each norm is clamped to at least this


def cosine_loss(pred, target, *, dim=-1, standardize_target=True, eps=1e-6):
    """``1 - mean(cos(pred, std(target)))`` with the cosine taken along ``dim``.

    ``cos = p·t / (max(|p|, 1e-8) · max(|t|, 1e-8))``. The target is a constant (no gradient).
    SdAE's official code reduces along the token axis (dim=1 of (B·F, M, D)); the paper's intent
    is the feature axis (dim=-1).
    """
    acc = accumulation_dtype(pred, target)
    p = pred.to(acc)
    t = target.detach().to(acc)
    if standardize_target:
        t = standardize(t, dim, eps)
    dot = (p * t).sum(dim)
    norms = p.norm(dim=dim).clamp_min(COS_EPS) * t.norm(dim=dim).clamp_min(COS_EPS)
    return 1.0 - (dot / norms).mean()
