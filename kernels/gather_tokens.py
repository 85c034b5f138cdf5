"""Triton ``gather_tokens`` (SPEC §1): token gather + pos_embed + prefix in one pass, and its backward.

Every program owns ``BLOCK_R`` flattened output rows × ``BLOCK_D`` features. The index stays the
(B·groups, M) int32/int64 tensor the caller gave: each program reads one index value per row, never
an expanded (…, D) int64 index. Forward is a pure copy plus one fp32 add rounded once, so it matches
the reference bit for bit. Backward: a tiny kernel counts the grad rows feeding each (image,
position) of x and notes one; the main kernel gives each position the row that feeds it (or walks
the image's rows where an index repeats) and sums in fp32: dx is written once in x's dtype,
deterministic and exact for repeated indices, with no fp32 (B, L, D) buffer, no sort and no
atomics on dx. dpos / dprefix sum over the images in registers; one fp32 atomic per program adds
the partial sums of its batch chunk, or, deterministic, each chunk stores its partial and one
fixed-order sum reduces them (bitwise identical from run to run).

An index outside [0, L) (possible under deferred checks, see ``sdae_fast.checks``) is skipped:
its output row is zeros and its gradient goes nowhere; never an out-of-bounds access.
Registered as ``torch.ops.sdae_fast.gather_tokens_triton`` (+ ``_backward``), see ``sdae_fast.library``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from sdae_fast.alloc import empty, zeros
from sdae_fast.library import kernel_op, launch, register_kernel_autograd

_INT32_LIMIT = 2**31 - 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _geometry_for_interpreter(interpreter: bool | None) -> bool:
    """``interpreter`` of the geometry helpers below (default: whether this process interprets) picks
    the interpreter's geometry or the GPU's; the offline sm_90 compile (:mod:`sdae_fast.kernel_variants`)
    asks for the GPU's."""
    return interpreting() if interpreter is None else interpreter


def feature_block(dim: int, interpreter: bool | None = None) -> int:
    """Power-of-two tile over D wasting the fewest lanes (768 -> 256 ×3, 1024 -> 1024, 33 -> 64)."""
    if _geometry_for_interpreter(interpreter):  # few, large programs: the interpreter pays per program
        return triton.next_power_of_2(dim)
    best = None
    for block in (1024, 512, 256, 128):  # larger first: ties go to fewer programs
        padded = triton.cdiv(dim, block) * block
        if best is None or padded < best[0]:
            best = (padded, block)
    return min(best[1], triton.next_power_of_2(dim))


def row_block(block_d: int, rows: int, interpreter: bool | None = None) -> int:
    """Rows per program: ~4096 elements a program on the GPU (16 B vectors, several rows in flight)."""
    target = 16384 if _geometry_for_interpreter(interpreter) else 4096
    return max(1, min(target // block_d, triton.next_power_of_2(max(rows, 1))))


# The token kernels' launch options on the GPU: 8 warps, 16 elements a thread. At 4 warps the
# 32 × 128 tiles of D = 384 (ViT-S) spilled 56-280 B (sm_90; the backward sums under Triton 3.6,
# every kernel's int64-offset variant under 3.6 and 3.8): each element carries its own address.
GPU_LAUNCH = {"num_warps": 8}


def launch_options() -> dict:
    return {} if interpreting() else dict(GPU_LAUNCH)


def needs_wide_offsets(*tensors) -> bool:
    """int64 address math only when some element offset (strided views included) could pass int32."""
    def last_offset(t):
        return sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0

    return any(t is not None and max(t.numel(), last_offset(t) + 1) > _INT32_LIMIT for t in tensors)


def rows_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """Features must be unit-stride for vector loads; row strides are passed to the kernels."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.contiguous()


def index_rows(index: torch.Tensor) -> torch.Tensor:
    """The kernels read an index's rows unit-stride (only the row stride is passed): a copy only when
    its inner stride is not 1. Forward and backward both read the index through this."""
    return index if index.stride(-1) == 1 else index.contiguous()


@triton.jit
def _gather_fwd_kernel(x_ptr, index_ptr, pos_ptr, prefix_ptr, out_ptr,
                       n_rows, seq_out, P, groups, L, D,
                       stride_xb, stride_xl, stride_ir, stride_pos, stride_pre,
                       HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr, WIDE: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    if WIDE:
        rows = rows.to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < D
    seq = rows // seq_out  # output sequence r
    t = rows - seq * seq_out  # position inside it
    is_patch = row_ok & (t >= P)
    idx = narrowed(tl.load(index_ptr + seq * stride_ir + tl.where(is_patch, t - P, 0), mask=is_patch, other=0),
                   L, WIDE)
    # An index outside [0, L) (deferred checks report it later) reads nothing: its row is zeros.
    is_patch = is_patch & (idx >= 0) & (idx < L)
    src = (seq // groups) * stride_xb + idx * stride_xl
    m_patch = is_patch[:, None] & col_ok[None, :]
    val = tl.load(x_ptr + src[:, None] + cols[None, :], mask=m_patch, other=0.0).to(tl.float32)
    if HAS_POS:
        pos = tl.load(pos_ptr + idx[:, None] * stride_pos + cols[None, :], mask=m_patch, other=0.0)
        val += pos.to(tl.float32)
    if HAS_PREFIX:
        is_pre = row_ok & (t < P)
        t_pre = tl.where(is_pre, t, 0)
        pre = tl.load(prefix_ptr + t_pre[:, None] * stride_pre + cols[None, :],
                      mask=is_pre[:, None] & col_ok[None, :], other=0.0)
        val = tl.where(is_pre[:, None], pre.to(tl.float32), val)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], val.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def narrowed(v, upper, WIDE: tl.constexpr):
    """An index value as int64 (``WIDE``) or int32. Before the int32 cast, values outside [0, upper)
    are clamped to -1 or ``upper``: the cast of an int64 past 2^31 would wrap, and could land in
    range (2^32 + 3 -> 3), where the range tests after it must see an out-of-range value."""
    return v.to(tl.int64) if WIDE else tl.minimum(tl.maximum(v, -1), upper).to(tl.int32)


@triton.jit
def _row_key(row, index_ptr, stride_ir, seq_out, P, groups, U, K, WIDE: tl.constexpr):
    """The destination slot a grad row feeds, or -1. Grad row ``row`` is position t of sequence
    seq = row // seq_out, from image seq // groups; rows t < P feed slot t, the others slot
    P + v with v = index[seq, t - P], none when v >= K (unshuffle's mask-token rows) or v < 0
    (an out-of-range index the deferred checks report: it feeds nothing)."""
    seq = row // seq_out
    t = row - seq * seq_out
    is_body = t >= P
    v = narrowed(tl.load(index_ptr + seq * stride_ir + tl.where(is_body, t - P, 0), mask=is_body, other=0), K, WIDE)
    key = (seq // groups) * U + tl.where(is_body, P + v, t)
    return tl.where(is_body & ((v >= K) | (v < 0)), -1, key)


@triton.jit
def _count_readers_kernel(index_ptr, count_ptr, reader_ptr, n_rows, stride_ir, seq_out, P, groups, U, K,
                          WIDE: tl.constexpr, BLOCK: tl.constexpr):
    # count (B·U,) int32 zero-filled: how many grad rows feed each slot; reader: one of them (the
    # only one wherever count == 1, which is all the segment kernel reads it for).
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if WIDE:
        rows = rows.to(tl.int64)
    ok = rows < n_rows
    # Rows past n_rows (the last block's tail) look up row 0 instead: their index reads would land
    # past the end of the index tensor (an illegal address on the GPU); their keys are dropped.
    key = _row_key(tl.where(ok, rows, 0), index_ptr, stride_ir, seq_out, P, groups, U, K, WIDE)
    ok = ok & (key >= 0)
    key = tl.where(ok, key, 0)
    tl.atomic_add(count_ptr + key, 1, mask=ok, sem="relaxed")
    tl.store(reader_ptr + key, rows.to(tl.int32) if not WIDE else rows, mask=ok)


@triton.jit
def _segment_sum_kernel(grad_ptr, index_ptr, count_ptr, reader_ptr, dx_ptr, dparam_ptr,
                        B, U, X0, D, batch_chunk, stride_ir, seq_out, P, groups, K,
                        NEED_X: tl.constexpr, NEED_PARAM: tl.constexpr, WIDE: tl.constexpr,
                        DETERMINISTIC: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr):
    # Destinations are (image b, slot u); dx[b, u - X0] (u >= X0) = Σ of the grad rows feeding
    # (b, u), written once in dx's dtype (zeros where nothing feeds it). dparam: that sum over the
    # images of this program (dprefix / dpos of gather_tokens), fp32: added with an atomic into a
    # zero-filled (U, D), or, DETERMINISTIC, stored as this batch chunk's row of (chunks, U, D).
    u = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b_start = tl.program_id(2) * batch_chunk
    if WIDE:  # an int64 loop start makes the image index (and all offsets from it) int64
        b_start = b_start.to(tl.int64)
    b_end = tl.minimum(b_start + batch_chunk, B)
    u_ok = u < U
    col_ok = cols < D
    m_u = u_ok[:, None] & col_ok[None, :]
    to_x = u_ok & (u >= X0)
    rows_per_image = groups * seq_out
    acc_param = tl.zeros((BLOCK_U, BLOCK_D), dtype=tl.float32)
    for b in range(b_start, b_end):
        dest = b * U + u
        count = tl.load(count_ptr + dest, mask=u_ok, other=0)
        single = count == 1
        src = tl.load(reader_ptr + dest, mask=single, other=0)
        src = src.to(tl.int64) if WIDE else src.to(tl.int32)
        acc = tl.load(grad_ptr + src[:, None] * D + cols[None, :], mask=single[:, None] & col_ok[None, :],
                      other=0.0).to(tl.float32)
        if tl.max(count, axis=0) > 1:
            # A slot read several times (repeated index): walk this image's grad rows in order and sum
            # the ones feeding it, in fp32 (deterministic). Rare; MAE / SdAE read each slot once.
            multi = count > 1
            row0 = b * rows_per_image
            for j in range(0, rows_per_image):
                key = _row_key(row0 + j, index_ptr, stride_ir, seq_out, P, groups, U, K, WIDE)
                hit = multi & (dest == key)
                acc += tl.load(grad_ptr + (row0 + j) * D + cols[None, :], mask=hit[:, None] & col_ok[None, :],
                               other=0.0).to(tl.float32)
        if NEED_X:
            tl.store(dx_ptr + (b * (U - X0) + u - X0)[:, None] * D + cols[None, :], acc.to(dx_ptr.dtype.element_ty),
                     mask=to_x[:, None] & col_ok[None, :])
        if NEED_PARAM:
            acc_param += acc
    if NEED_PARAM:
        if DETERMINISTIC:
            part = tl.program_id(2).to(tl.int64) * U * D
            tl.store(dparam_ptr + part + u[:, None] * D + cols[None, :], acc_param, mask=m_u)
        else:
            tl.atomic_add(dparam_ptr + u[:, None] * D + cols[None, :], acc_param, mask=m_u, sem="relaxed")


def batch_chunk(batch: int, position_programs: int) -> int:
    """Images per program: ~2048 programs fill an H100/H200 (132 SMs, several resident each) while
    each still sums several images, which keeps the per-program fp32 atomics for dpos few."""
    if interpreting():
        return max(batch, 1)
    chunks = max(1, min(batch, 2048 // max(position_programs, 1)))
    return triton.cdiv(batch, chunks)


def _grid(n_rows: int, dim: int):
    block_d = feature_block(dim)
    block_r = row_block(block_d, n_rows)
    return (triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d)), block_r, block_d


def segment_sums(grad: torch.Tensor, index: torch.Tensor, dx, *, need_param: bool, deterministic: bool,
                 batch: int, slots: int, x0: int, seq_out: int, p: int, groups: int, keep: int):
    """For every (image b, slot u): the fp32 sum of the grad rows feeding it (see ``_row_key``) goes
    to dx[b, u - x0] (u >= x0; written once, in dx's dtype) and, with ``need_param``, its sum over
    the images is returned as an fp32 (slots, D) (else None).

    Two launches and no sort: one counts the readers of each slot and notes one of them; the other
    reads the single reader of each slot directly and walks the image's rows only where a slot has
    several. grad is contiguous with rows of D features; index rows are unit-stride (``index_rows``).
    The per-image sums are exact fp32 adds in a fixed order; only the sum over batch chunks is an
    fp32 atomic, unless ``deterministic``: then each chunk stores its partial and one ``sum`` over
    the chunks reduces them in a fixed order.
    """
    dim = grad.shape[-1]
    n_rows = grad.numel() // dim if dim else 0
    if n_rows == 0:  # nothing feeds any slot (no rows, or rows of no features): every sum is zero
        if dx is not None:
            dx.zero_()
        return zeros(slots, dim, dtype=torch.float32, device=grad.device) if need_param else None
    wide = needs_wide_offsets(grad, dx) or n_rows > _INT32_LIMIT
    count = zeros(batch * slots, dtype=torch.int32, device=grad.device)
    reader = empty(batch * slots, dtype=torch.int64 if wide else torch.int32, device=grad.device)
    block = min(1024, triton.next_power_of_2(n_rows))
    launch(_count_readers_kernel)[(triton.cdiv(n_rows, block),)](
        index, count, reader, n_rows, index.stride(0), seq_out, p, groups, slots, keep,
        WIDE=wide, BLOCK=block, **launch_options())
    block_d = feature_block(dim)
    # ~4096 elements a program on the GPU (several rows in flight per image); all slots in the interpreter.
    block_u = triton.next_power_of_2(slots) if interpreting() else row_block(block_d, slots)
    position_programs = triton.cdiv(slots, block_u) * triton.cdiv(dim, block_d)
    chunk = batch_chunk(batch, position_programs)
    grid = (triton.cdiv(slots, block_u), triton.cdiv(dim, block_d), triton.cdiv(batch, chunk))
    dparam = None
    if need_param:
        dparam = (empty(grid[2], slots, dim, dtype=torch.float32, device=grad.device) if deterministic
                  else zeros(slots, dim, dtype=torch.float32, device=grad.device))
    launch(_segment_sum_kernel)[grid](
        grad, index, count, reader, grad if dx is None else dx, grad if dparam is None else dparam,
        batch, slots, x0, dim, chunk, index.stride(0), seq_out, p, groups, keep,
        NEED_X=dx is not None, NEED_PARAM=need_param, WIDE=wide, DETERMINISTIC=deterministic,
        BLOCK_U=block_u, BLOCK_D=block_d, **launch_options())
    return dparam.sum(0) if need_param and deterministic else dparam


def _cast(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return acc if acc.dtype == dtype else acc.to(dtype)


@kernel_op("gather_tokens_triton")
def gather_tokens_triton(x: torch.Tensor, index: torch.Tensor, pos_embed: Optional[torch.Tensor],
                         prefix: Optional[torch.Tensor], groups: int, deterministic: bool) -> torch.Tensor:
    """Forward of the Triton gather (``deterministic`` only matters to its backward)."""
    batch, length, dim = x.shape
    n_seq, m = index.shape
    p = 0 if prefix is None else prefix.shape[0]
    x, pos_embed, prefix = rows_contiguous(x), rows_contiguous(pos_embed), rows_contiguous(prefix)
    index = index_rows(index)
    out = empty(n_seq, p + m, dim, dtype=x.dtype, device=x.device)
    n_rows = n_seq * (p + m)
    wide = needs_wide_offsets(x, out, pos_embed)
    if n_rows and dim:
        grid, block_r, block_d = _grid(n_rows, dim)
        launch(_gather_fwd_kernel)[grid](
            x, index, x if pos_embed is None else pos_embed, x if prefix is None else prefix, out,
            n_rows, p + m, p, groups, length, dim,
            x.stride(0), x.stride(1), index.stride(0),
            0 if pos_embed is None else pos_embed.stride(0), 0 if prefix is None else prefix.stride(0),
            HAS_POS=pos_embed is not None, HAS_PREFIX=prefix is not None, WIDE=wide,
            BLOCK_R=block_r, BLOCK_D=block_d, **launch_options())
    return out


@gather_tokens_triton.register_fake
def _gather_fake(x, index, pos_embed, prefix, groups, deterministic):
    p = 0 if prefix is None else prefix.shape[0]
    return x.new_empty(index.shape[0], p + index.shape[1], x.shape[2])


@kernel_op("gather_tokens_triton_backward")
def gather_tokens_triton_backward(grad_out: torch.Tensor, index: torch.Tensor, batch: int, length: int,
                                  num_prefix: int, groups: int, x_dtype: torch.dtype, need_x: bool, need_param: bool,
                                  deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx (B, L, D) in x's dtype, or empty; d[prefix; pos_embed] (P + L, D) fp32, or empty)."""
    grad_out = grad_out.contiguous()
    index = index_rows(index)  # autograd saves the caller's index, which may be strided
    dim = grad_out.shape[-1]
    slots = num_prefix + length
    dx = empty(batch, length, dim, dtype=x_dtype, device=grad_out.device) if need_x else None
    dparam = None
    if batch and dim:
        dparam = segment_sums(grad_out, index, dx, need_param=need_param, deterministic=deterministic, batch=batch,
                              slots=slots, x0=num_prefix, seq_out=grad_out.shape[1], p=num_prefix, groups=groups,
                              keep=length)
    elif need_x:
        dx.zero_()
    if need_param and dparam is None:
        dparam = zeros(slots, dim, dtype=torch.float32, device=grad_out.device)
    return (grad_out.new_empty(0) if dx is None else dx,
            grad_out.new_empty(0, dtype=torch.float32) if dparam is None else dparam)


@gather_tokens_triton_backward.register_fake
def _gather_backward_fake(grad_out, index, batch, length, num_prefix, groups, x_dtype, need_x, need_param,
                          deterministic):
    dim = grad_out.shape[-1]
    dx = grad_out.new_empty(batch, length, dim, dtype=x_dtype) if need_x else grad_out.new_empty(0)
    dparam = grad_out.new_empty(num_prefix + length if need_param else 0, *((dim,) if need_param else ()),
                                dtype=torch.float32)
    return dx, dparam


def _gather_setup(ctx, inputs, output):
    x, index, pos_embed, prefix, groups, deterministic = inputs
    ctx.save_for_backward(index)
    ctx.meta = (x.shape[0], x.shape[1], 0 if prefix is None else prefix.shape[0], groups, x.dtype,
                None if pos_embed is None else pos_embed.dtype, None if prefix is None else prefix.dtype, deterministic)


def _gather_backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    batch, length, p, groups, x_dtype, pos_dtype, pre_dtype, deterministic = ctx.meta
    need_x, _, need_pos, need_pre = ctx.needs_input_grad[:4]
    need_pos, need_pre = need_pos and pos_dtype is not None, need_pre and pre_dtype is not None
    if not (need_x or need_pos or need_pre):
        return None, None, None, None, None, None
    dx, dparam = torch.ops.sdae_fast.gather_tokens_triton_backward(
        grad_out, index, batch, length, p, groups, x_dtype, need_x, need_pos or need_pre, deterministic)
    return (dx if need_x else None, None,
            _cast(dparam[p:], pos_dtype) if need_pos else None,
            _cast(dparam[:p], pre_dtype) if need_pre else None, None, None)


register_kernel_autograd(gather_tokens_triton, _gather_backward, _gather_setup)


def gather_tokens(x, index, *, pos_embed=None, prefix=None, groups=1, deterministic=False):
    """Triton backend of :func:`sdae_fast.ops.masking.gather_tokens` (inputs already validated)."""
    return torch.ops.sdae_fast.gather_tokens_triton(x, index, pos_embed, prefix, groups, deterministic)
