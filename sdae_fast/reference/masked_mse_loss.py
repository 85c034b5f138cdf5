"""MAE's masked pixel loss (SPEC §4)."""
from .stats import accumulation_dtype, standardize


def masked_mse_loss(pred, target, mask, *, norm_target=True):
    """Per-patch MSE, averaged over masked patches only: ``sum(loss · mask) / sum(mask)``.

    pred, target (B, L, P); mask (B, L), 1 where a patch was removed. With ``norm_target`` the
    target is standardised per patch (unbiased variance, eps 1e-6), MAE's ``norm_pix_loss``.
    """
    acc = accumulation_dtype(pred, target)
    t = target.detach().to(acc)
    if norm_target:
        t = standardize(t, -1, 1e-6)
    loss = ((pred.to(acc) - t) ** 2).mean(dim=-1)
    m = mask.to(acc)
    return (loss * m).sum() / m.sum()
