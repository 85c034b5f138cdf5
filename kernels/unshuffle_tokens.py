"""Triton ``unshuffle_tokens`` (SPEC §1): MAE's decoder input in one pass, and its backward.

Forward: each program owns ``BLOCK_R`` flattened output rows × ``BLOCK_D`` features; a row reads one
``ids_restore`` value and copies either the visible token it names or the mask token, then adds
pos_embed in fp32 (rounded once: bitwise equal to the reference). No (B, L, D) int64 index and no
concatenation buffers.

Backward, two passes over the grad: (1) d x_vis: a tiny kernel counts the positions reading each
visible token; each token then sums its readers in fp32 and is written once in x_vis's dtype: deterministic, no atomics, correct for any ids_restore (tokens read
twice sum both, tokens nobody reads get zeros); (2) d pos_embed and d mask_token: each program owns
a block of positions × features and walks a chunk of the batch, so the sums stay in registers
(one fp32 atomic per program at the end; with ``deterministic``, a stored partial per program and
one fixed-order sum instead: bitwise identical from run to run). An ids_restore value outside
[0, L) (deferred checks report it) takes the mask token. Registered as
``torch.ops.sdae_fast.unshuffle_tokens_triton`` (+ ``_backward``), see ``sdae_fast.library``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from sdae_fast.alloc import empty, zeros
from sdae_fast.library import kernel_op, launch, register_kernel_autograd

from .gather_tokens import (_cast, batch_chunk, feature_block, index_rows, interpreting, launch_options, narrowed,
                            needs_wide_offsets, row_block, rows_contiguous, segment_sums)


@triton.jit
def _unshuffle_fwd_kernel(x_ptr, ids_ptr, mask_ptr, pos_ptr, out_ptr,
                          n_rows, T, P, K, D, stride_xb, stride_xl, stride_ib, stride_pos,
                          HAS_POS: tl.constexpr, WIDE: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    if WIDE:
        rows = rows.to(tl.int64)
    row_ok = rows < n_rows
    col_ok = cols < D
    b = rows // T
    t = rows - b * T  # output position: < P prefix, else patch t - P
    is_body = row_ok & (t >= P)
    k = narrowed(tl.load(ids_ptr + b * stride_ib + tl.where(is_body, t - P, 0), mask=is_body, other=0), K, WIDE)
    # A k outside [0, L) (deferred checks report it later) takes the mask token like k >= K does.
    from_x = row_ok & ((t < P) | ((k >= 0) & (k < K)))
    src_row = tl.where(is_body, P + k, t)  # the x_vis row this output row copies
    m_x = from_x[:, None] & col_ok[None, :]
    val = tl.load(x_ptr + (b * stride_xb + src_row * stride_xl)[:, None] + cols[None, :], mask=m_x,
                  other=0.0).to(tl.float32)
    token = tl.load(mask_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    val = tl.where(from_x[:, None], val, token[None, :])
    if HAS_POS:
        pos = tl.load(pos_ptr + t[:, None] * stride_pos + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                      other=0.0)
        val += pos.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], val.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _unshuffle_param_grads_kernel(grad_ptr, ids_ptr, dmask_ptr, dpos_ptr,
                                  B, T, P, K, D, stride_ib, batch_chunk,
                                  NEED_MASK: tl.constexpr, NEED_POS: tl.constexpr, WIDE: tl.constexpr,
                                  DETERMINISTIC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad (B, T, D) contiguous. Each program sums its positions over a chunk of images in
    # registers, then adds them with one atomic each into dmask (D,) and dpos (T, D), fp32 zero-
    # filled; DETERMINISTIC, it stores them as its own row of dmask (chunks · position blocks, D)
    # and of dpos (chunks, T, D) instead, for one fixed-order sum afterwards.
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    b_start = tl.program_id(2) * batch_chunk
    if WIDE:  # an int64 loop start makes the image index (and all offsets from it) int64
        b_start = b_start.to(tl.int64)
    b_end = tl.minimum(b_start + batch_chunk, B)
    t_ok = t < T
    col_ok = cols < D
    m_t = t_ok[:, None] & col_ok[None, :]
    is_body = t_ok & (t >= P)
    i = tl.where(is_body, t - P, 0)
    acc_pos = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    acc_mask = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for b in range(b_start, b_end):
        g = tl.load(grad_ptr + (b * T + t)[:, None] * D + cols[None, :], mask=m_t, other=0.0).to(tl.float32)
        if NEED_POS:
            acc_pos += g
        if NEED_MASK:
            k = tl.load(ids_ptr + b * stride_ib + i, mask=is_body, other=0)
            acc_mask += tl.where((is_body & ((k >= K) | (k < 0)))[:, None], g, 0.0)
    if DETERMINISTIC:
        chunk = tl.program_id(2).to(tl.int64)
        if NEED_POS:
            tl.store(dpos_ptr + chunk * T * D + t[:, None] * D + cols[None, :], acc_pos, mask=m_t)
        if NEED_MASK:
            part = chunk * tl.num_programs(0) + tl.program_id(0)
            tl.store(dmask_ptr + part * D + cols, tl.sum(acc_mask, axis=0), mask=col_ok)
    else:
        if NEED_POS:
            tl.atomic_add(dpos_ptr + t[:, None] * D + cols[None, :], acc_pos, mask=m_t, sem="relaxed")
        if NEED_MASK:
            tl.atomic_add(dmask_ptr + cols, tl.sum(acc_mask, axis=0), mask=col_ok, sem="relaxed")


@kernel_op("unshuffle_tokens_triton")
def unshuffle_tokens_triton(x_vis: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                            pos_embed: Optional[torch.Tensor], num_prefix: int, deterministic: bool) -> torch.Tensor:
    """Forward of the Triton unshuffle (``deterministic`` only matters to its backward)."""
    batch, rows_in, dim = x_vis.shape
    length = ids_restore.shape[1]
    seq = num_prefix + length
    x_vis, pos_embed = rows_contiguous(x_vis), rows_contiguous(pos_embed)
    mask_token = mask_token.contiguous()
    ids_restore = index_rows(ids_restore)
    out = empty(batch, seq, dim, dtype=x_vis.dtype, device=x_vis.device)
    n_rows = batch * seq
    if n_rows and dim:
        block_d = feature_block(dim)
        block_r = row_block(block_d, n_rows)
        grid = (triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d))
        launch(_unshuffle_fwd_kernel)[grid](
            x_vis, ids_restore, mask_token, x_vis if pos_embed is None else pos_embed, out,
            n_rows, seq, num_prefix, rows_in - num_prefix, dim,
            x_vis.stride(0), x_vis.stride(1), ids_restore.stride(0),
            0 if pos_embed is None else pos_embed.stride(0),
            HAS_POS=pos_embed is not None, WIDE=needs_wide_offsets(x_vis, out),
            BLOCK_R=block_r, BLOCK_D=block_d, **launch_options())
    return out


@unshuffle_tokens_triton.register_fake
def _unshuffle_fake(x_vis, ids_restore, mask_token, pos_embed, num_prefix, deterministic):
    return x_vis.new_empty(x_vis.shape[0], num_prefix + ids_restore.shape[1], x_vis.shape[2])


def _param_grads(grad_out, ids_restore, num_prefix, keep, need_mask, need_pos, deterministic):
    """(dmask (D,), dpos (T, D)) in fp32, each None when not needed; grad_out (B, T, D) contiguous,
    ids_restore rows unit-stride (``index_rows``)."""
    batch, seq, dim = grad_out.shape
    f32 = dict(dtype=torch.float32, device=grad_out.device)
    if not (batch and seq and dim):
        return (zeros(dim, **f32) if need_mask else None), (zeros(seq, dim, **f32) if need_pos else None)
    block_d = feature_block(dim)
    # ~4096 elements a program on the GPU (several rows in flight per image); all in the interpreter.
    block_t = triton.next_power_of_2(seq) if interpreting() else row_block(block_d, seq)
    chunk = batch_chunk(batch, triton.cdiv(seq, block_t) * triton.cdiv(dim, block_d))
    grid = (triton.cdiv(seq, block_t), triton.cdiv(dim, block_d), triton.cdiv(batch, chunk))
    if deterministic:  # one partial per program (mask) / per batch chunk (pos), summed below in a fixed order
        dmask = empty(grid[2] * grid[0], dim, **f32) if need_mask else grad_out
        dpos = empty(grid[2], seq, dim, **f32) if need_pos else grad_out
    else:
        dmask = zeros(dim, **f32) if need_mask else grad_out
        dpos = zeros(seq, dim, **f32) if need_pos else grad_out
    launch(_unshuffle_param_grads_kernel)[grid](
        grad_out, ids_restore, dmask, dpos, batch, seq, num_prefix, keep, dim, ids_restore.stride(0),
        chunk, NEED_MASK=need_mask, NEED_POS=need_pos, WIDE=needs_wide_offsets(grad_out),
        DETERMINISTIC=deterministic, BLOCK_T=block_t, BLOCK_D=block_d, **launch_options())
    if deterministic:
        dmask, dpos = (dmask.sum(0) if need_mask else None), (dpos.sum(0) if need_pos else None)
    return (dmask if need_mask else None), (dpos if need_pos else None)


@kernel_op("unshuffle_tokens_triton_backward")
def unshuffle_tokens_triton_backward(grad_out: torch.Tensor, ids_restore: torch.Tensor, rows_in: int,
                                     num_prefix: int, x_dtype: torch.dtype, need_x: bool, need_mask: bool,
                                     need_pos: bool, deterministic: bool
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d x_vis in x_vis's dtype, d mask_token (D,) fp32, d pos_embed (T, D) fp32), each empty when not needed."""
    grad_out = grad_out.contiguous()
    ids_restore = index_rows(ids_restore)  # autograd saves the caller's ids_restore, which may be strided
    batch, seq, dim = grad_out.shape
    keep = rows_in - num_prefix
    dx = empty(batch, rows_in, dim, dtype=x_dtype, device=grad_out.device) if need_x else None
    if need_x and not (batch and seq and dim):
        dx.zero_()
    elif need_x:
        # d x_vis: each visible token sums the grad rows that read it (any ids_restore, no atomics)
        segment_sums(grad_out, ids_restore, dx, need_param=False, deterministic=deterministic, batch=batch,
                     slots=rows_in, x0=0, seq_out=seq, p=num_prefix, groups=1, keep=keep)
    dmask, dpos = _param_grads(grad_out, ids_restore, num_prefix, keep, need_mask, need_pos, deterministic)
    return (grad_out.new_empty(0) if dx is None else dx,
            grad_out.new_empty(0, dtype=torch.float32) if dmask is None else dmask,
            grad_out.new_empty(0, dtype=torch.float32) if dpos is None else dpos)


@unshuffle_tokens_triton_backward.register_fake
def _unshuffle_backward_fake(grad_out, ids_restore, rows_in, num_prefix, x_dtype, need_x, need_mask, need_pos,
                             deterministic):
    batch, seq, dim = grad_out.shape
    f32 = torch.float32
    return (grad_out.new_empty(batch, rows_in, dim, dtype=x_dtype) if need_x else grad_out.new_empty(0),
            grad_out.new_empty(dim, dtype=f32) if need_mask else grad_out.new_empty(0, dtype=f32),
            grad_out.new_empty(seq, dim, dtype=f32) if need_pos else grad_out.new_empty(0, dtype=f32))


def _unshuffle_setup(ctx, inputs, output):
    x_vis, ids_restore, mask_token, pos_embed, num_prefix, deterministic = inputs
    ctx.save_for_backward(ids_restore)
    ctx.meta = (x_vis.shape[1], num_prefix, x_vis.dtype, mask_token.dtype,
                None if pos_embed is None else pos_embed.dtype, deterministic)


def _unshuffle_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    rows_in, num_prefix, x_dtype, mask_dtype, pos_dtype, deterministic = ctx.meta
    need_x, _, need_mask, need_pos = ctx.needs_input_grad[:4]
    need_pos = need_pos and pos_dtype is not None
    if not (need_x or need_mask or need_pos):
        return None, None, None, None, None, None
    dx, dmask, dpos = torch.ops.sdae_fast.unshuffle_tokens_triton_backward(
        grad_out, ids_restore, rows_in, num_prefix, x_dtype, need_x, need_mask, need_pos, deterministic)
    return (dx if need_x else None, None,
            _cast(dmask, mask_dtype) if need_mask else None,
            _cast(dpos, pos_dtype) if need_pos else None, None, None)


register_kernel_autograd(unshuffle_tokens_triton, _unshuffle_backward, _unshuffle_setup)


def unshuffle_tokens(x_vis, ids_restore, mask_token, *, pos_embed=None, num_prefix=0, deterministic=False):
    """Triton backend of :func:`sdae_fast.ops.masking.unshuffle_tokens` (inputs already validated)."""
    return torch.ops.sdae_fast.unshuffle_tokens_triton(x_vis, ids_restore, mask_token, pos_embed, num_prefix,
                                                       deterministic)
