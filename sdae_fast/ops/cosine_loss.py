"""SdAE's cosine loss (SPEC §4): ``cosine_loss``."""
from __future__ import annotations

from .. import reference
from ..dispatch import op
from ..validate import check_same_device, check_tensor

COSINE_LOSS = op("cosine_loss", auto_order=("triton", "torch"),
                 schema="(Tensor pred, Tensor target, *, int dim, bool standardize_target=True, float eps=1e-06) -> Tensor")
COSINE_LOSS.register("torch")(reference.cosine_loss)

# Mirrors sdae_fast.kernels.cosine_loss.MAX_BLOCK_N without importing the kernel module.
TRITON_MAX_VECTOR = 16384


def _triton_why_not(pred, target, *, dim, standardize_target=True, eps=1e-6):
    n = pred.shape[dim]
    if n > TRITON_MAX_VECTOR:
        return [f"the Triton kernel holds a whole vector in registers: size {n} along dim {dim} exceeds {TRITON_MAX_VECTOR}"]
    return []


@COSINE_LOSS.register("triton", why_not=_triton_why_not)
def _triton(pred, target, *, dim, standardize_target=True, eps=1e-6):
    from ..kernels.cosine_loss import cosine_loss as triton_cosine_loss

    return triton_cosine_loss(pred, target, dim=dim, standardize_target=standardize_target, eps=eps)


def cosine_loss(pred, target, *, dim=-1, standardize_target=True, eps=1e-6, backend=None):
    """``1 - mean(cos(pred, standardize(target)))`` along ``dim``; fp32 scalar; no gradient to target.

    See :func:`sdae_fast.reference.cosine_loss` for the exact formula. The Triton backend reads
    pred and target once and writes d loss / d pred in the same pass; its backward only scales that
    buffer (and returns it as is for a unit upstream gradient, at the cost of one 4-byte
    device->host copy).
    """
    check_tensor("pred", pred)
    check_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must share one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    check_same_device(pred=pred, target=target)
    if pred.dim() == 0 or not -pred.dim() <= dim < pred.dim():
        raise ValueError(f"dim={dim} is out of range for a tensor of shape {tuple(pred.shape)}")
    if pred.numel() == 0:
        raise ValueError("pred is empty: the mean cosine of no vectors is undefined")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    dim = dim % pred.dim()
    return COSINE_LOSS(pred, target, dim=dim, standardize_target=standardize_target, eps=eps, backend=backend)
