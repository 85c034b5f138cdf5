"""Fused DINO loss (SPEC §4): one read of the student logits for the statistics, one for the loss and
the gradient; no softmax of width K is ever materialised.

Sweep 1 (``_dino_stats_kernel``), grid (B, splits): each program streams one K-chunk of one batch
element, keeping an online max/sum for every student and teacher row, and writes them as partials.
Splitting K into up to 32 chunks fills the GPU (B=64, K=65536: 2048 programs); the split count
depends on K only, so a row's result never depends on its batch.
Sweep 2 (``_dino_grad_kernel``), same grid: each program combines the (up to 32) partials of its
batch element into each row's max m and log-sum log l, then streams its chunk again and forms,
element by element, ``-log p_v = log l_v - (x_v - m_v)`` (x = s/Ts, as log_softmax does: never
``lse - x``, whose lse ~ |x| would round away a small loss), the pairs' cross-entropies
``Σ_{g≠v} q_g · (-log p_v)`` (non-negative terms: no cancellation) into a partial loss, and the
student gradient ``dL/ds_v = (n_v · p_v − Σ_{g≠v} q_g) / (pairs · B · Ts)``. Backward only scales it.
The centre update runs after the loss (which sees the old centre): the reference's
``update_center_`` itself (column sums in fp32 without an fp32 copy, all-reduced across processes).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from sdae_fast.alloc import empty
from sdae_fast.library import kernel_op, launch, register_saved_grad_autograd
from sdae_fast.reference.dino_loss import update_center_

from .loss_grad import scale_saved_grad


@triton.jit
def _load_tile(s_rows, t_rows, c_ptr, k, K, v_ok, g_ok):
    """Columns ``k`` of every student row, teacher row and the centre, in fp32 (both sweeps)."""
    k_ok = k < K
    s = tl.load(s_rows[:, None] + k[None, :], mask=v_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    t = tl.load(t_rows[:, None] + k[None, :], mask=g_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
    c = tl.load(c_ptr + k, mask=k_ok, other=0.0).to(tl.float32)
    return k, k_ok, s, t, c


@triton.jit
def _dino_stats_kernel(
    s_ptr, t_ptr, c_ptr,
    ms_ptr, ls_ptr, mt_ptr, lt_ptr,
    B, K, CHUNK, NSPLIT,
    stride_s, stride_t,
    inv_ts, inv_tt,
    V: tl.constexpr, G: tl.constexpr, VP: tl.constexpr, GP: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    rows_v = tl.arange(0, VP)
    rows_g = tl.arange(0, GP)
    cols = tl.arange(0, BLOCK_K)
    # Padded rows (v >= V, g >= G) read zeros: finite statistics that are never used.
    s_rows = s_ptr + (rows_v * B + b).to(tl.int64) * stride_s
    t_rows = t_ptr + (rows_g * B + b).to(tl.int64) * stride_t
    v_ok = rows_v < V
    g_ok = rows_g < G

    m_s = tl.full([VP], float("-inf"), tl.float32)
    l_s = tl.zeros([VP], tl.float32)
    m_t = tl.full([GP], float("-inf"), tl.float32)
    l_t = tl.zeros([GP], tl.float32)
    k_start = split * CHUNK
    # Every chunk holds at least one column < K (the launcher sizes the splits), so the maxima
    # are finite after the first tile and exp(m_old - m_new) never sees (-inf) - (-inf).
    for k0 in range(k_start, k_start + CHUNK, BLOCK_K):
        k, k_ok, s, t, c = _load_tile(s_rows, t_rows, c_ptr, k0 + cols, K, v_ok, g_ok)
        x, u = _scaled(s, t, c, k_ok, inv_ts, inv_tt)
        m_s_new = tl.maximum(m_s, tl.max(x, axis=1))
        l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(x - m_s_new[:, None]), axis=1)
        m_s = m_s_new
        m_t_new = tl.maximum(m_t, tl.max(u, axis=1))
        l_t = l_t * tl.exp(m_t - m_t_new) + tl.sum(tl.exp(u - m_t_new[:, None]), axis=1)
        m_t = m_t_new

    part = b * NSPLIT + split
    tl.store(ms_ptr + part * VP + rows_v, m_s)
    tl.store(ls_ptr + part * VP + rows_v, l_s)
    tl.store(mt_ptr + part * GP + rows_g, m_t)
    tl.store(lt_ptr + part * GP + rows_g, l_t)


@triton.jit
def _scaled(s, t, c, k_ok, inv_ts, inv_tt):
    """The scaled logits x = s/Ts and u = (t - c)/Tt of a tile, -inf past K, each product rounded
    on its own: the select keeps the compiler from fusing it into the subtraction that follows (an
    FMA rounds once), so both sweeps see the same x and u, and a tensor teacher_temp (sharpened in
    torch, run at Tt = 1) the same u as its float."""
    x = tl.where(k_ok[None, :], s * inv_ts, float("-inf"))
    u = tl.where(k_ok[None, :], (t - c[None, :]) * inv_tt, float("-inf"))
    return x, u


@triton.jit
def _combine(m_ptr, l_ptr, base, p_ok, rows, ROWS: tl.constexpr):
    """One batch element's (max, log-sum) per row from its K-chunk partials (SP x ROWS)."""
    m = tl.load(m_ptr + base[:, None] * ROWS + rows[None, :], mask=p_ok[:, None], other=float("-inf"))
    l = tl.load(l_ptr + base[:, None] * ROWS + rows[None, :], mask=p_ok[:, None], other=0.0)
    m_all = tl.max(m, axis=0)
    return m_all, tl.log(tl.sum(l * tl.exp(m - m_all[None, :]), axis=0))


@triton.jit
def _dino_grad_kernel(
    s_ptr, t_ptr, c_ptr, g_ptr, loss_ptr,
    ms_ptr, ls_ptr, mt_ptr, lt_ptr,
    B, K, CHUNK, NSPLIT,
    stride_s, stride_t, stride_g,
    inv_ts, inv_tt, grad_scale,
    V: tl.constexpr, G: tl.constexpr, VP: tl.constexpr, GP: tl.constexpr, SP: tl.constexpr,
    BLOCK_K: tl.constexpr, WRITE_GRAD: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    rows_v = tl.arange(0, VP)
    rows_g = tl.arange(0, GP)
    v_ok = rows_v < V
    g_ok = rows_g < G
    parts = tl.arange(0, SP)
    base = b * NSPLIT + parts
    p_ok = parts < NSPLIT
    # The row statistics of batch element b, combined from its K-chunk partials (SP <= 32 loads).
    # log p_v = (x - m_s) - log l_s, kept apart, never as x - lse: lse ~ |x| would round away the
    # small log l and cost the loss of a confident student its relative precision.
    m_s, log_l_s = _combine(ms_ptr, ls_ptr, base, p_ok, rows_v, VP)
    m_t, log_l_t = _combine(mt_ptr, lt_ptr, base, p_ok, rows_g, GP)

    pair = g_ok[:, None] & v_ok[None, :] & (rows_g[:, None] != rows_v[None, :])
    n_v = tl.sum(pair.to(tl.float32), axis=0)  # teacher views paired with student view v
    cols = tl.arange(0, BLOCK_K)
    s_rows = s_ptr + (rows_v * B + b).to(tl.int64) * stride_s
    t_rows = t_ptr + (rows_g * B + b).to(tl.int64) * stride_t
    g_rows = g_ptr + (rows_v * B + b).to(tl.int64) * stride_g
    loss_acc = tl.zeros([VP, BLOCK_K], tl.float32)
    k_start = split * CHUNK
    for k0 in range(k_start, k_start + CHUNK, BLOCK_K):
        k, k_ok, s, t, c = _load_tile(s_rows, t_rows, c_ptr, k0 + cols, K, v_ok, g_ok)
        x, u = _scaled(s, t, c, k_ok, inv_ts, inv_tt)
        neg_log_p = tl.where(k_ok[None, :], log_l_s[:, None] - (x - m_s[:, None]), 0.0)  # (VP, BK)
        q = tl.exp((u - m_t[:, None]) - log_l_t[:, None])  # (GP, BK), 0 past K
        q_sum = tl.sum(tl.where(pair[:, :, None], q[:, None, :], 0.0), axis=0)  # (VP, BK): Σ_{g≠v} q_g
        loss_acc += q_sum * neg_log_p  # the cross-entropies of the chunk's pairs, element by element
        if WRITE_GRAD:
            p = tl.exp(-neg_log_p)
            grad = (n_v[:, None] * p - q_sum) * grad_scale
            tl.store(g_rows[:, None] + k[None, :], grad.to(g_ptr.dtype.element_ty),
                     mask=v_ok[:, None] & k_ok[None, :])
    tl.store(loss_ptr + b * NSPLIT + split, tl.sum(tl.sum(tl.where(v_ok[:, None], loss_acc, 0.0), axis=1), axis=0))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _prev_pow2(n: int) -> int:
    return 1 << max(0, int(n).bit_length() - 1)


def gpu_block_k(rows: int) -> int:
    """K tile of a GPU launch: (rows, BLOCK_K) fp32 products in registers, ~8192 per program."""
    return max(64, min(512, _prev_pow2(8192 // rows)))


MAX_SPLITS = 32  # K-chunks per row of the student logits (fewer when the row has fewer tiles)


def _launch_shape(width: int, rows: int, device: torch.device, block_k: int | None, splits: int | None):
    """(BLOCK_K, chunk, splits): up to MAX_SPLITS chunks of K per batch element, every chunk
    non-empty; the batch size does not enter (see below).

    ``rows`` = padded global × padded views: the (rows, BLOCK_K) products live in registers, so
    BLOCK_K shrinks as the view count grows (256 for DINO's 2 × 10 views).
    """
    if block_k is None:
        block_k = gpu_block_k(rows) if device.type == "cuda" else 512
    block_k = min(block_k, _next_pow2(width))
    tiles = triton.cdiv(width, block_k)
    if splits is None:
        # A function of the width alone, never of the batch: each row's partial statistics then
        # combine in the same order in any batch (batch invariance). 32 chunks of DINO's 65536
        # columns (8 tiles of 256) give 2048 programs at 64 images and 256 at 8.
        splits = MAX_SPLITS
    splits = max(1, min(splits, tiles))
    chunk = triton.cdiv(tiles, splits) * block_k
    return block_k, chunk, triton.cdiv(width, chunk)


def _dino_forward(student, teacher, center, student_temp, teacher_temp, num_global, write_grad,
                  block_k=None, splits=None):
    batch = teacher.shape[0] // num_global
    views = student.shape[0] // batch
    width = student.shape[1]
    student = student if student.stride(1) == 1 else student.contiguous()
    teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
    center = center.reshape(-1).contiguous()
    dev = student.device
    vp, gp = max(2, _next_pow2(views)), max(2, _next_pow2(num_global))
    block_k, chunk, nsplit = _launch_shape(width, vp * gp, dev, block_k, splits)
    parts = batch * nsplit
    f32 = torch.float32
    m_s, l_s = empty(parts, vp, dtype=f32, device=dev), empty(parts, vp, dtype=f32, device=dev)
    m_t, l_t = empty(parts, gp, dtype=f32, device=dev), empty(parts, gp, dtype=f32, device=dev)
    loss_parts = empty(parts, dtype=f32, device=dev)  # each (element, K-chunk)'s cross-entropies
    grad = empty(*student.shape, dtype=student.dtype, device=dev) if write_grad else loss_parts
    pairs = num_global * views - min(num_global, views)
    grid = (batch, nsplit)
    inv_ts, inv_tt = 1.0 / student_temp, 1.0 / teacher_temp
    grad_scale, factor = inv_ts / (pairs * batch), None
    if write_grad and student.dtype == torch.float16:
        # |n_v p - Σ_{g≠v} q_g| <= n_v <= num_global, so every element of the unit gradient is at most
        # bound. That is ~1/(T·B·pairs), times ~1/K for a typical element: fp16 subnormals, which
        # GradScaler's upstream 2^16 comes too late to rescue. Store it times 2^k, the bound in
        # [2^14, 2^15) (no overflow possible), and let the backward apply 2^-k in fp32 (loss_grad).
        k = 14 - math.floor(math.log2(num_global * grad_scale))
        grad_scale *= 2.0 ** k
        factor = torch.full((1, 1), 2.0 ** -k, dtype=torch.float32, device=dev)  # (1, 1): fp32 math in backward
    warps = 8 if dev.type == "cuda" else 1
    launch(_dino_stats_kernel)[grid](
        student, teacher, center, m_s, l_s, m_t, l_t,
        batch, width, chunk, nsplit, student.stride(0), teacher.stride(0), inv_ts, inv_tt,
        V=views, G=num_global, VP=vp, GP=gp, BLOCK_K=block_k, num_warps=warps,
    )
    launch(_dino_grad_kernel)[grid](
        student, teacher, center, grad, loss_parts, m_s, l_s, m_t, l_t,
        batch, width, chunk, nsplit, student.stride(0), teacher.stride(0), grad.stride(0) if write_grad else 0,
        inv_ts, inv_tt, grad_scale,
        V=views, G=num_global, VP=vp, GP=gp, SP=max(2, _next_pow2(nsplit)), BLOCK_K=block_k,
        WRITE_GRAD=write_grad, num_warps=warps,
    )
    loss = loss_parts.sum() / (pairs * batch)  # a fixed-order sum of non-negative partials
    return loss, (grad if write_grad else None), factor


@kernel_op("dino_loss_triton")
def dino_loss_triton(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
                     teacher_temp: float, num_global: int, write_grad: bool, block_k: Optional[int],
                     splits: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d student for a unit upstream gradient or empty, the factor it still lacks:
    2^-k of shape (1, 1) for fp16, else a 0-dim 1): the loss and the student gradient in one forward;
    the backward scales the stored gradient."""
    loss, grad, factor = _dino_forward(student, teacher, center, student_temp, teacher_temp, num_global,
                                       write_grad, block_k, splits)
    return (loss, student.new_empty(0) if grad is None else grad,
            torch.ones((), dtype=torch.float32, device=student.device) if factor is None else factor)


@dino_loss_triton.register_fake
def _dino_fake(student, teacher, center, student_temp, teacher_temp, num_global, write_grad, block_k, splits):
    f32 = torch.float32
    factor_shape = (1, 1) if write_grad and student.dtype == torch.float16 else ()
    return (student.new_empty((), dtype=f32), student.new_empty(student.shape if write_grad else (0,)),
            student.new_empty(factor_shape, dtype=f32))


register_saved_grad_autograd(dino_loss_triton, scale_saved_grad)


def dino_loss(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04, num_global=2,
              center_momentum=0.9, update_center=True, block_k=None, splits=None):
    """Fused DINO loss; same contract as ``sdae_fast.reference.dino_loss`` (fp32 scalar).

    ``block_k``/``splits`` override the launch shape (tests use them to exercise the split combine).
    Under ``torch.no_grad()`` (evaluation) the gradient sweep is skipped.
    """
    write_grad = torch.is_grad_enabled() and student_out.requires_grad
    loss = torch.ops.sdae_fast.dino_loss_triton(student_out, teacher_out.detach(), center.detach(),
                                                float(student_temp), float(teacher_temp), int(num_global),
                                                write_grad, block_k, splits)[0]
    if update_center:  # the reference's update: one piece of code, rounded as DINO's
        update_center_(center, teacher_out.detach(), center_momentum)
    return loss

