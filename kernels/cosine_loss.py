"""SdAE's cosine loss in one pass (SPEC §4): loss and d loss / d pred from a single read of the inputs.

The tensors are viewed as (outer, n, inner) with n the size of the cosine axis, so one kernel
serves every ``dim``: for dim = last (inner = 1) a program owns BLOCK_V whole vectors, contiguous
along n; otherwise it owns a [n, BLOCK_V] tile of one outer slab, contiguous along inner (SdAE's
official dim=1 on (B·F, M, D) reads M × BLOCK_V with D contiguous). Either way the reduction runs
along axis 0 of a register tile.

The target is standardised along ``standardize_dim``. When that is the cosine axis the tile
standardises itself in registers. When it is another axis (SdAE's official dim=1 with features
standardised per token), a first small kernel computes each target vector's mean and 1/std along
that axis (8 bytes per vector, never the standardised target) and the loss kernel applies them
element by element as it loads the target.

Liger-style: the forward writes the gradient for a unit upstream gradient; the backward only
scales it, never re-reading pred or target. For fp16 each vector is stored times its own power of
two, whose inverse the backward applies (see loss_grad).
"""
import math

import torch
import triton
import triton.language as tl

from ..alloc import empty
from ..dispatch import triton_interpreting
from ..library import kernel_op, launch, register_saved_grad_autograd
from .loss_grad import pow2_normalizer, scale_saved_grad, scales_per_vector
from .row_stats import mean_rstd_along, standardize_along

MAX_BLOCK_N = 16384  # a whole vector lives in registers; longer ones are refused by the op's why_not
# STANDARDIZE modes of the loss kernel.
NO_STD, STD_IN_TILE, STD_FROM_STATS = 0, 1, 2


@triton.jit
def _tile_offsets(pid, n, inner, num_inner_blocks, num_vectors,
                  INNER_ONE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """Element offsets of a [BLOCK_N, BLOCK_V] tile of vectors along n in the (outer, n, inner)
    view, the validity mask, the vectors' validity and their flat vector index."""
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
        vec = slab * inner + i
    valid = (k[:, None] < n) & vec_ok[None, :]
    return offs, valid, vec_ok, vec


@triton.jit
def _vector_stats_kernel(
    x_ptr, mean_ptr, rstd_ptr, n, inner, num_inner_blocks, num_vectors, inv_n, inv_n_minus_1, eps,
    INNER_ONE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """Mean and 1/sqrt(var_unbiased + eps) of every vector along n: one fp32 pair per vector."""
    offs, valid, vec_ok, vec = _tile_offsets(tl.program_id(0), n, inner, num_inner_blocks, num_vectors,
                                             INNER_ONE, BLOCK_N, BLOCK_V)
    x = tl.load(x_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    _, mean, rstd = mean_rstd_along(x, valid, inv_n, inv_n_minus_1, eps, 0)
    tl.store(mean_ptr + vec, mean, mask=vec_ok)
    tl.store(rstd_ptr + vec, rstd, mask=vec_ok)


@triton.jit
def _cosine_loss_fwd_kernel(
    pred_ptr, target_ptr, grad_ptr, scale_ptr, partial_ptr, mean_ptr, rstd_ptr,
    n, inner, num_inner_blocks, num_vectors,
    inv_n, inv_n_minus_1, std_eps, cos_eps, grad_scale, std_block, std_inner,
    STANDARDIZE: tl.constexpr, WRITE_GRAD: tl.constexpr, VECTOR_SCALE: tl.constexpr, INNER_ONE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    offs, valid, vec_ok, vec = _tile_offsets(pid, n, inner, num_inner_blocks, num_vectors,
                                             INNER_ONE, BLOCK_N, BLOCK_V)
    p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if STANDARDIZE == 1:
        t = standardize_along(t, valid, inv_n, inv_n_minus_1, std_eps, 0)
    elif STANDARDIZE == 2:
        # The target vector along standardize_dim holding element o, in that axis's
        # (outer, size, inner) view: (o // (size·inner)) · inner + o % inner.
        stat = (offs // std_block) * std_inner + offs % std_inner
        mean = tl.load(mean_ptr + stat, mask=valid, other=0.0)
        rstd = tl.load(rstd_ptr + stat, mask=valid, other=0.0)
        t = tl.where(valid, (t - mean) * rstd, 0.0)

    dot = tl.sum(p * t, axis=0)
    norm_p = tl.sqrt(tl.sum(p * p, axis=0))
    norm_t = tl.sqrt(tl.sum(t * t, axis=0))
    clamped_p = tl.maximum(norm_p, cos_eps)
    inv_norms = 1.0 / (clamped_p * tl.maximum(norm_t, cos_eps))
    cos = dot * inv_norms
    tl.store(partial_ptr + pid, tl.sum(tl.where(vec_ok, cos, 0.0), axis=0))

    if WRITE_GRAD:
        # d cos / d p = t / (|p|c |t|c) - cos · p / |p|², the second term only where |p| is not
        # clamped: clamp_min passes gradient where |p| >= eps and is flat below it (autograd of
        # the reference). clamped_p in the divisor keeps a zero vector finite (its coefficient is 0).
        coef = tl.where(norm_p >= cos_eps, cos / (clamped_p * clamped_p), 0.0)
        grad = grad_scale * (t * inv_norms[None, :] - coef[None, :] * p)
        if VECTOR_SCALE:  # fp16: each vector's max |grad| to [2^14, 2^15), the inverse saved (see loss_grad)
            up, down = pow2_normalizer(tl.max(tl.where(valid, tl.abs(grad), 0.0), axis=0))
            grad = grad * up[None, :]
            tl.store(scale_ptr + vec, down, mask=vec_ok)
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


def _view(shape, dim: int):
    """(outer, n, inner) of ``shape`` around axis ``dim``."""
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def _factor_shape(shape, dim: int):
    """``shape`` with axis ``dim`` of size 1: one entry per vector, in the (outer, inner) order of
    the kernel's flat vector index, broadcasting against the gradient."""
    return (*shape[:dim], 1, *shape[dim + 1:])


def _grid(outer: int, inner: int, block_v: int):
    """(programs, inner blocks per outer slab) of the tile layout."""
    if inner == 1:
        return triton.cdiv(outer, block_v), 1
    blocks = triton.cdiv(inner, block_v)
    return outer * blocks, blocks


def target_stats(t, standardize_dim: int, std_eps: float):
    """Per-vector fp32 mean and 1/std of ``t`` (contiguous) along ``standardize_dim``, and the
    (size·inner, inner) of that axis's view that maps an element offset to its vector."""
    outer, n, inner = _view(t.shape, standardize_dim)
    num_vectors = outer * inner
    block_n, block_v, num_warps = _launch_config(n, inner, num_vectors)
    grid, num_inner_blocks = _grid(outer, inner, block_v)
    mean = empty(num_vectors, dtype=torch.float32, device=t.device)
    rstd = empty(num_vectors, dtype=torch.float32, device=t.device)
    launch(_vector_stats_kernel)[(grid,)](
        t, mean, rstd, n, inner, num_inner_blocks, num_vectors, 1.0 / n, 1.0 / max(n - 1, 1), float(std_eps),
        INNER_ONE=inner == 1, BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps,
    )
    return mean, rstd, n * inner, inner


def cosine_loss_forward(pred, target, dim: int, standardize_target: bool, standardize_dim: int, eps: float,
                        std_eps: float, write_grad: bool):
    """(fp32 scalar loss, grad w.r.t. pred or None, its per-vector fp32 factor or None).

    The grad is for a unit upstream gradient. For fp16 pred each vector of it is stored times a
    power of two whose inverse the factor holds, shaped ``shape`` with ``dim`` of size 1 (see
    loss_grad); otherwise it is final and the factor is None.
    """
    shape = pred.shape
    outer, n, inner = _view(shape, dim)
    num_vectors = outer * inner
    p = pred.contiguous()
    t = target.detach().contiguous()
    block_n, block_v, num_warps = _launch_config(n, inner, num_vectors)
    per_vector = write_grad and scales_per_vector(pred.dtype)
    grid, num_inner_blocks = _grid(outer, inner, block_v)
    mode = NO_STD if not standardize_target else STD_IN_TILE if standardize_dim == dim else STD_FROM_STATS
    if mode == STD_FROM_STATS:
        mean, rstd, std_block, std_inner = target_stats(t, standardize_dim, std_eps)
    else:
        mean, rstd, std_block, std_inner = t, t, 1, 1  # unread
    grad = empty(*shape, dtype=pred.dtype, device=pred.device) if write_grad else p
    scale = empty(*_factor_shape(shape, dim), dtype=torch.float32, device=pred.device) if per_vector else p  # unread
    partials = empty(grid, dtype=torch.float32, device=pred.device)
    launch(_cosine_loss_fwd_kernel)[(grid,)](
        p, t, grad, scale, partials, mean, rstd,
        n, inner, num_inner_blocks, num_vectors,
        1.0 / n, 1.0 / max(n - 1, 1), float(std_eps), float(eps), -1.0 / num_vectors,
        std_block, std_inner,
        STANDARDIZE=mode, WRITE_GRAD=write_grad, VECTOR_SCALE=per_vector, INNER_ONE=inner == 1,
        BLOCK_N=block_n, BLOCK_V=block_v, num_warps=num_warps,
    )
    # Per-program partial sums reduced by torch: deterministic (no atomics), fp32.
    loss = torch.rsub(partials.sum(), 1.0, alpha=1.0 / num_vectors)  # 1 - Σcos / V in one launch
    return loss, (grad if write_grad else None), (scale if per_vector else None)


@kernel_op("cosine_loss_triton")
def cosine_loss_triton(pred: torch.Tensor, target: torch.Tensor, dim: int, standardize_target: bool,
                       standardize_dim: int, eps: float, std_eps: float,
                       write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred for a unit upstream gradient or empty, the factor it still lacks:
    fp16's per-vector inverse powers of two, else a 0-dim 1)."""
    loss, grad, factor = cosine_loss_forward(pred, target, dim, standardize_target, standardize_dim, eps, std_eps,
                                             write_grad)
    return (loss, pred.new_empty(0) if grad is None else grad,
            torch.ones((), dtype=torch.float32, device=pred.device) if factor is None else factor)


@cosine_loss_triton.register_fake
def _cosine_fake(pred, target, dim, standardize_target, standardize_dim, eps, std_eps, write_grad):
    f32 = torch.float32
    factor_shape = _factor_shape(pred.shape, dim) if write_grad and scales_per_vector(pred.dtype) else ()
    return (pred.new_empty((), dtype=f32), pred.new_empty(pred.shape if write_grad else (0,)),
            pred.new_empty(factor_shape, dtype=f32))


register_saved_grad_autograd(cosine_loss_triton, scale_saved_grad)


def cosine_loss(pred, target, *, dim: int, standardize_target: bool = True, standardize_dim: int | None = None,
                eps: float = 1e-8, std_eps: float = 1e-6):
    """Triton backend of :func:`sdae_fast.ops.cosine_loss` (``dim``, ``standardize_dim`` non-negative)."""
    # target is a constant (SPEC §4): detached here, so a target that requires grad neither makes
    # the loss differentiable when pred is not, nor reaches the backward.
    standardize_dim = dim if standardize_dim is None else standardize_dim
    write_grad = torch.is_grad_enabled() and pred.requires_grad
    return torch.ops.sdae_fast.cosine_loss_triton(pred, target.detach(), dim, standardize_target, standardize_dim,
                                                  eps, std_eps, write_grad)[0]
