"""MAE's masked pixel loss (SPEC §4)."""
import torch

from .stats import accumulation_dtype, standardize


def masked_mse_loss(pred, target, mask, *, norm_target=True):
    """Per-patch MSE, averaged over masked patches only: ``sum(loss · mask) / sum(mask)``.

    pred, target (B, L, P); mask (B, L), 1 where a patch was removed. With ``norm_target`` the
    target is standardised per patch (unbiased variance, eps 1e-6), MAE's ``norm_pix_loss``.

    Unmasked patches are *selected away* before any arithmetic, not multiplied by 0: a NaN or inf
    in a patch the loss does not cover cannot reach the loss (NaN · 0 = NaN) nor pred's gradient,
    which is exactly 0 there (as the Triton kernel, which never reads those patches).
    """
    acc = accumulation_dtype(pred, target)
    covered = (mask != 0)[..., None]
    p = torch.where(covered, pred.to(acc), 0.0)
    t = torch.where(covered, target.detach().to(acc), 0.0)
    if norm_target:
        t = standardize(t, -1, 1e-6)
    loss = ((p - t) ** 2).mean(dim=-1)
    m = mask.detach().to(acc)  # a constant, as the target: only pred gets a gradient (as the kernel)
    return (loss * m).sum() / m.sum()
