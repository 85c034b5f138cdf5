"""MAE's masked pixel loss (SPEC §4): ``masked_mse_loss``."""
from __future__ import annotations

import torch

from .. import checks, reference
from ..dispatch import op
from ..validate import check_same_device, check_shape, check_tensor, names_its_errors

MASKED_MSE_LOSS = op("masked_mse_loss", auto_order=("triton", "torch"),
                     schema="(Tensor pred, Tensor target, Tensor mask, *, bool norm_target=True) -> Tensor")
EMPTY_MASK = checks.register("masked_mse_loss", ValueError,
                             "mask selects no patch (or patches are empty): the masked mean is undefined")
MASKED_MSE_LOSS.register("torch")(reference.masked_mse_loss)

# Mirrors sdae_fast.kernels.masked_mse_loss.MAX_BLOCK_P without importing the kernel module.
TRITON_MAX_PATCH = 16384


def _triton_why_not(pred, target, mask, *, norm_target=True):
    if pred.shape[-1] > TRITON_MAX_PATCH:
        return [f"the Triton kernel holds a whole patch in registers: {pred.shape[-1]} values exceed {TRITON_MAX_PATCH}"]
    return []


@MASKED_MSE_LOSS.register("triton", why_not=_triton_why_not)
def _triton(pred, target, mask, *, norm_target=True):
    from ..kernels.masked_mse_loss import masked_mse_loss as triton_masked_mse_loss

    return triton_masked_mse_loss(pred, target, mask, norm_target=norm_target)


MASK_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.bool, torch.uint8, torch.int32, torch.int64)


@names_its_errors('masked_mse_loss')
def masked_mse_loss(pred, target, mask, *, norm_target=True, backend=None):
    """Per-patch MSE against the (standardised) target, averaged over masked patches; fp32 scalar
    (float64 for float64 pred/target, on the torch reference only: for fidelity checks).

    pred, target (B, L, P); mask (B, L) with 1 where the patch was removed. An all-zero mask is a
    ValueError (the mean over no patches is undefined; the loss is NaN): raised at the next
    ``sdae_fast.check_errors()`` (no host sync), or at the call with ``SDAE_FAST_CHECKS=eager``.
    NaN or inf in an unmasked patch does not influence the loss on any backend.

    Mask values are weights: the loss is ``sum(loss · mask) / sum(mask)`` over the patches whose
    mask is nonzero, on every backend. MAE's masks are 0/1; other values are not checked: values
    summing to 0 (+1 and -1) give ±inf or NaN, a NaN mask value gives NaN.
    The Triton backend never reads pred/target of unmasked patches (their gradient is written as
    zeros) and writes d loss / d pred in the forward pass; its backward only scales that buffer.
    """
    check_tensor("pred", pred, ndim=3)
    check_tensor("target", target, ndim=3)
    check_tensor("mask", mask, ndim=2, dtypes=MASK_DTYPES)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must share one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    check_shape("mask", mask, pred.shape[:2])
    check_same_device(pred=pred, target=target, mask=mask)
    if pred.shape[-1] == 0 or mask.numel() == 0:
        raise ValueError(f"masked_mse_loss: {EMPTY_MASK.message}")
    checks.not_all_zero(EMPTY_MASK, mask)
    return MASKED_MSE_LOSS(pred, target, mask, norm_target=norm_target, backend=backend)
