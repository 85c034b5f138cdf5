"""SdAE's cosine loss on standardised teacher features (SPEC §4)."""

from .stats import accumulation_dtype, standardize

COS_EPS = 1e-8  # F.cosine_similarity's default: each norm is clamped to at least this


def cosine_loss(pred, target, *, dim=-1, standardize_target=True, standardize_dim=-1, eps=COS_EPS, std_eps=1e-6):
    """``1 - mean(cos(pred, std(target)))``: standardise along ``standardize_dim``, cosine along ``dim``.

    ``std(t) = (t - mean) / sqrt(var_unbiased + std_eps)`` per vector along ``standardize_dim``;
    ``cos = p·t / (max(|p|, eps) · max(|t|, eps))`` per vector along ``dim``; the mean runs over
    every remaining position. The two axes are independent. SdAE's official code standardises each
    teacher token over its features and takes the cosine over the token axis of the (B·F, M, D)
    tensors: ``dim=1, standardize_dim=-1``. The paper's reading is ``dim=-1, standardize_dim=-1``.
    The target is a constant (no gradient).
    """
    acc = accumulation_dtype(pred, target)
    p = pred.to(acc)
    t = target.detach().to(acc)
    if standardize_target:
        t = standardize(t, standardize_dim, std_eps)
    dot = (p * t).sum(dim)
    norms = p.norm(dim=dim).clamp_min(eps) * t.norm(dim=dim).clamp_min(eps)
    return 1.0 - (dot / norms).mean()
