"""SdAE's cosine loss in one pass (SPEC §4): loss and d loss / d pred from a single read of the inputs.

The tensors are viewed as (outer, n, inner) with n the size of the cosine axis, so one kernel
serves every ``dim``: for dim = last (inner = 1) a program owns BLOCK_V whole vectors, contiguous
along n; otherwise it owns a [n, BLOCK_V] tile of one outer slab, contiguous along inner (SdAE's
official dim=1 on (B·F, M, D) reads M × BLOCK_V with D contiguous). Either way the reduction runs
along axis 0 of a register tile.

Liger-style: the forward writes the gradient for a unit upstream gradient; the backward only
scales it, never re-reading pred or target.
"""
import math

import torch
import triton
import triton.language as tl

from ..alloc import empty
from ..dispatch import triton_interpreting
from ..library import kernel_op, launch, register_saved_grad_autograd
from .loss_grad import defers_mean_factor, scale_saved_grad
from .row_stats import standardize_along

COS_EPS = tl.constexpr(1e-8)  # F.cosine_similarity's clamp on each norm (sdae_fast.reference.cosine_loss.COS_EPS)
MAX_BLOCK_N = 16384  # a whole vector lives in registers; longer ones are refused by the op's why_not


@triton.jit
def _cosine_loss_fwd_kernel(
    pred_ptr, target_ptr, grad_ptr, partial_ptr,
    n, inner, num_inner_blocks, num_vectors,
    inv_n, inv_n_minus_1, eps, grad_scale,
    STANDARDIZE: tl.constexpr, WRITE_GRAD: tl.constexpr, INNER_ONE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    k = tl.arange(0, BLOCK_N)
    lane = tl.arange(0, BLOCK_V)
    if INNER_ONE:
        vec = pid.to(tl.int64) * BLOCK_V + lane
        vec_ok = vec < num_vectors
        offs = vec[None, :] * n + k[:, None]
    else:
        slab = (pid // num_inner_blocks).to(tl.int64)
        i = (pid % num_inner_blocks) * BLOCK_V + lane
        vec_ok = i < inner
        offs = slab * n * inner + k[:, None] * inner + i[None, :]
    valid = (k[:, None] < n) & vec_ok[None, :]

    p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if STANDARDIZE:
        t = standardize_along(t, valid, inv_n, inv_n_minus_1, eps, 0)

    dot = tl.sum(p * t, axis=0)
    norm_p = tl.sqrt(tl.sum(p * p, axis=0))
    norm_t = tl.sqrt(tl.sum(t * t, axis=0))
    clamped_p = tl.maximum(norm_p, COS_EPS)
    inv_norms = 1.0 / (clamped_p * tl.maximum(norm_t, COS_EPS))
    cos = dot * inv_norms
    tl.store(partial_ptr + pid, tl.sum(tl.where(vec_ok, cos, 0.0), axis=0))

    if WRITE_GRAD:
        # d cos / d p = t / (|p|c |t|c) - cos · p / |p|², the second term only where |p| is not
        # clamped: clamp_min passes gradient where |p| >= 1e-8 and is flat below it (autograd of
        # the reference). clamped_p in the divisor keeps a zero vector finite (its coefficient is 0).
        coef = tl.where(norm_p >= COS_EPS, cos / (clamped_p * clamped_p), 0.0)
        grad = grad_scale * (t * inv_norms[None, :] - coef[None, :] * p)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _launch_config(n: int, inner: int, num_vectors: int):
    block_n = triton.next_power_of_2(n)
    # Elements per program: big tiles on the GPU hide latency without spilling; in the interpreter
    # every program is a python loop iteration, so fewer, larger ones are much faster.
    tile = 1 << 16 if triton_interpreting() else 4096
    lanes = max(1, tile // block_n)
    block_v = min(triton.next_power_of_2(num_vectors if inner == 1 else inner), lanes)
    elements = block_n * block_v
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_n, block_v, num_warps


def cosine_loss_forward(pred, target, dim: int, standardize_target: bool, eps: float, write_grad: bool):
    """(fp32 scalar loss, grad w.r.t. pred or None, the mean's factor the grad still lacks or None).

    The grad is for a unit upstream gradient; for fp16 pred it is V times that (see loss_grad).
    """
    shape = pred.shape
    n = shape[dim]
    outer = math.prod(shape[:dim])
    inner = math.prod(shape[dim + 1:])
    num_vectors = outer * inner
    p = pred.contiguous()
    t = target.detach().contiguous()
    block_n, block_v, num_warps = _launch_config(n, inner, num_vectors)
    deferred = write_grad and defers_mean_factor(pred.dtype)
    if inner == 1:
        num_inner_blocks = 1
        grid = triton.cdiv(num_vectors, block_v)
    else:
        num_inner_blocks = triton.cdiv(inner, block_v)
        grid = outer * num_inner_blocks
    grad = empty(*shape, dtype=pred.dtype, device=pred.device) if write_grad else p
    partials = empty(grid, dtype=torch.float32, device=pred.device)
    launch(_cosine_loss_fwd_kernel)[(grid,)](
        p, t, grad, partials,
        n, inner, num_inner_blocks, num_vectors,
        1.0 / n, 1.0 / max(n - 1, 1), float(eps), -1.0 if deferred else -1.0 / num_vectors,
        STANDARDIZE=bool(standardize_target), WRITE_GRAD=write_grad, INNER_ONE=inner == 1,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps,
    )
    # Per-program partial sums reduced by torch: deterministic (no atomics), fp32.
    loss = torch.rsub(partials.sum(), 1.0, alpha=1.0 / num_vectors)  # 1 - Σcos / V in one launch
    return loss, (grad if write_grad else None), (1.0 / num_vectors if deferred else None)


@kernel_op("cosine_loss_triton")
def cosine_loss_triton(pred: torch.Tensor, target: torch.Tensor, dim: int, standardize_target: bool, eps: float,
                       write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred for a unit upstream gradient or empty, the mean's factor it still lacks)."""
    loss, grad, factor = cosine_loss_forward(pred, target, dim, standardize_target, eps, write_grad)
    return (loss, pred.new_empty(0) if grad is None else grad,
            torch.full((), 1.0 if factor is None else factor, dtype=torch.float32, device=pred.device))


@cosine_loss_triton.register_fake
def _cosine_fake(pred, target, dim, standardize_target, eps, write_grad):
    f32 = torch.float32
    return pred.new_empty((), dtype=f32), pred.new_empty(pred.shape if write_grad else (0,)), pred.new_empty((), dtype=f32)


def _scale(grad, grad_output, factor):
    return scale_saved_grad(grad, grad_output, factor if defers_mean_factor(grad.dtype) else None)


register_saved_grad_autograd(cosine_loss_triton, _scale)


def cosine_loss(pred, target, *, dim: int, standardize_target: bool = True, eps: float = 1e-6):
    """Triton backend of :func:`sdae_fast.ops.cosine_loss` (``dim`` already non-negative)."""
    # target is a constant (SPEC §4): detached here, so a target that requires grad neither makes
    # the loss differentiable when pred is not, nor reaches the backward.
    write_grad = torch.is_grad_enabled() and pred.requires_grad
    return torch.ops.sdae_fast.cosine_loss_triton(pred, target.detach(), dim, standardize_target, eps, write_grad)[0]
