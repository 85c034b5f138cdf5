"""Top-K homologous attention (SPEC §3): ``topk_attention``."""
from __future__ import annotations

from .. import reference
from ..dispatch import op, triton_installed
from ..validate import (check_float, check_int, check_last_dim_contiguous, check_same_device, check_same_dtype,
                        check_tensor, names_its_errors)

TOPK_ATTENTION = op("topk_attention", auto_order=("triton", "torch"),
                    schema="(Tensor q, Tensor k, Tensor v, int topk, *, float? scale=None) -> Tensor")
TOPK_ATTENTION.register("torch")(reference.topk_attention)

TRITON_MAX_HEAD_DIM = 128


TRITON_MAX_HEADS = 65535  # B·H is the grid's second axis


def _triton_why_not(q, k, v, topk, *, scale=None):
    reasons = []
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        reasons.append(f"head dim {q.shape[-1]} > {TRITON_MAX_HEAD_DIM} (the q, k, v tiles would not fit on chip)")
    if q.shape[0] * q.shape[1] > TRITON_MAX_HEADS:
        reasons.append(f"B·H = {q.shape[0] * q.shape[1]} > {TRITON_MAX_HEADS} (the kernel grid's second axis)")
    if triton_installed():
        from ..kernels.topk_attention import why_not

        reasons += why_not(q, k, v)
    return reasons


@TOPK_ATTENTION.register("triton", why_not=_triton_why_not)
def _triton(q, k, v, topk, *, scale=None):
    from ..kernels.topk_attention import topk_attention as fused

    return fused(q, k, v, topk, scale=scale)


@names_its_errors('topk_attention')
def topk_attention(q, k, v, topk: int, *, scale=None, backend=None):
    """Softmax attention where each query keeps only its ``topk`` best keys (ties at the threshold kept).

    q, k, v (B, H, N, d), one dtype and device, contiguous in d. ``topk >= N`` is dense attention.
    float64 inputs run on the torch reference, in float64 (for fidelity checks); triton and cuda refuse them.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
        check_last_dim_contiguous(name, t)
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape (B, H, N, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    topk = check_int("topk", topk, ge=1)
    if q.shape[-1] == 0:
        raise ValueError(f"the head dim d of q, k, v must be >= 1, got shape {tuple(q.shape)}")
    if scale is not None:
        scale = check_float("scale", scale)
    return TOPK_ATTENTION(q, k, v, topk, scale=scale, backend=backend)
