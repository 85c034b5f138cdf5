"""SdAE's cosine loss (SPEC §4): ``cosine_loss``."""
from __future__ import annotations

from .. import reference
from ..dispatch import op
from ..validate import check_dims, check_float, check_same_device, check_tensor, names_its_errors

COSINE_LOSS = op("cosine_loss", auto_order=("triton", "torch"),
                 schema="(Tensor pred, Tensor target, *, int dim, bool standardize_target=True, int standardize_dim=-1, "
                        "float eps=1e-08, float std_eps=1e-06) -> Tensor")
COSINE_LOSS.register("torch")(reference.cosine_loss)

# Mirrors sdae_fast.kernels.cosine_loss.MAX_BLOCK_N without importing the kernel module.
TRITON_MAX_VECTOR = 16384


def _triton_why_not(pred, target, *, dim, standardize_target=True, standardize_dim=-1, eps=1e-8, std_eps=1e-6):
    why = []
    axes = (dim, standardize_dim) if standardize_target else (dim,)
    for axis in sorted(set(axes)):
        n = pred.shape[axis]
        if n > TRITON_MAX_VECTOR:
            why.append(f"the Triton kernel holds a whole vector in registers: size {n} along dim {axis} "
                       f"exceeds {TRITON_MAX_VECTOR}")
    return why


@COSINE_LOSS.register("triton", why_not=_triton_why_not)
def _triton(pred, target, *, dim, standardize_target=True, standardize_dim=-1, eps=1e-8, std_eps=1e-6):
    from ..kernels.cosine_loss import cosine_loss as triton_cosine_loss

    return triton_cosine_loss(pred, target, dim=dim, standardize_target=standardize_target,
                              standardize_dim=standardize_dim, eps=eps, std_eps=std_eps)


@names_its_errors('cosine_loss')
def cosine_loss(pred, target, *, dim=-1, standardize_target=True, standardize_dim=-1, eps=1e-8, std_eps=1e-6,
                backend=None):
    """``1 - mean(cos(pred, standardize(target)))``; fp32 scalar (float64 for float64 inputs, on the
    torch reference only: for fidelity checks; triton refuses them); no gradient to target.

    The target is standardised along ``standardize_dim`` (unbiased variance, ``std_eps``), the
    cosine taken along ``dim`` (each norm clamped to ``eps``): two independent axes. SdAE's
    official loss is ``dim=1, standardize_dim=-1`` on (B·F, M, D); the paper's reading
    ``dim=-1``. See :func:`sdae_fast.reference.cosine_loss` for the exact formula. The Triton
    backend reads pred and target once (plus one read of the target for its per-vector mean and
    1/std when the two axes differ, never writing the standardised target) and writes d loss /
    d pred in the same pass; its backward only scales that buffer by the upstream gradient, a
    device scalar (no host sync).
    """
    check_tensor("pred", pred)
    check_tensor("target", target)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must share one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    check_same_device(pred=pred, target=target)
    # Every axis argument through one check (normalised to [0, ndim)), every epsilon through another.
    dims = check_dims(pred.dim(), dim=dim, standardize_dim=standardize_dim)
    eps = check_float("eps", eps, ge=0.0)
    std_eps = check_float("std_eps", std_eps, ge=0.0)
    if pred.numel() == 0:
        raise ValueError("pred is empty: the mean cosine of no vectors is undefined")
    return COSINE_LOSS(pred, target, dim=dims["dim"], standardize_target=standardize_target,
                       standardize_dim=dims["standardize_dim"], eps=eps, std_eps=std_eps, backend=backend)
