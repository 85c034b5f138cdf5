"""Per-vector standardisation inside a tile, shared by the SdAE cosine loss and MAE's norm_pix_loss.

Both losses standardise the target along one axis of a register tile: ``(t - mean) / sqrt(var + eps)``
with the UNBIASED variance (divisor ``max(n - 1, 1)``, so a one-element vector becomes 0, not NaN),
matching :func:`sdae_fast.reference.stats.standardize`.
"""
import triton
import triton.language as tl


@triton.jit
def mean_rstd_along(x, valid, inv_n, inv_n_minus_1, eps, AXIS: tl.constexpr):
    """(zero-padded tile, mean, 1/sqrt(var_unbiased + eps)) of fp32 tile ``x`` along ``AXIS``.

    ``inv_n`` = 1/n and ``inv_n_minus_1`` = 1/max(n - 1, 1) come from the host: n may be a
    specialised constant and an int-to-float cast of it is not portable across Triton versions.
    Two passes over registers (mean, then squared deviations) rather than E[x²] - E[x]², which
    cancels badly for targets with a large mean (raw pixels, un-normalised features).
    """
    x = tl.where(valid, x, 0.0)
    mean = tl.sum(x, axis=AXIS) * inv_n
    dev = tl.where(valid, x - tl.expand_dims(mean, AXIS), 0.0)
    var = tl.sum(dev * dev, axis=AXIS) * inv_n_minus_1
    return dev, mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def standardize_along(x, valid, inv_n, inv_n_minus_1, eps, AXIS: tl.constexpr):
    """Standardise fp32 tile ``x`` along ``AXIS``; ``valid`` marks real elements (others come back 0)."""
    dev, mean, rstd = mean_rstd_along(x, valid, inv_n, inv_n_minus_1, eps, AXIS)
    return dev * tl.expand_dims(rstd, AXIS)
