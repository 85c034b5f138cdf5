"""Deferred value checks in one launch each (``sdae_fast.checks``), for CUDA tensors.

The torch-op version of a check costs about ten tiny launches (aminmax, compares, the table
update); on the GPU those dominate a small op's host time. Here one program reads the 2-d tensor
and, when the check fails, writes the failure into its row of the checks table (kept if one is
already there) and bumps the table's failure count: no host sync, one launch, the same table
layout the torch path writes. Two checks: every (integer) value in [lower, upper) — an index
range, non-negative labels — recording the min, the max and ``upper``; or "not all zero" — a
mask that selects something.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdae_fast.library import kernel_op, launch

_BIG = tl.constexpr(2**62)


@triton.jit
def _value_check_kernel(x_ptr, table_ptr, rows, cols, stride_r, lower, upper, slot_row,
                        ALL_ZERO: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    lo = tl.full((), _BIG, tl.int64)
    hi = tl.full((), -_BIG, tl.int64)
    c = tl.arange(0, BLOCK_C)
    for start in range(0, rows, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = (r < rows)[:, None] & (c < cols)[None, :]
        v = tl.load(x_ptr + r[:, None].to(tl.int64) * stride_r + c[None, :], mask=ok, other=0)
        if ALL_ZERO:
            v = (v != 0).to(tl.int64)  # any dtype: a 0.5 mask entry selects, a 0 does not
        else:
            v = v.to(tl.int64)
        lo = tl.minimum(lo, tl.min(tl.min(tl.where(ok, v, _BIG), axis=1), axis=0))
        hi = tl.maximum(hi, tl.max(tl.max(tl.where(ok, v, -_BIG), axis=1), axis=0))
    if ALL_ZERO:
        failed = (hi == 0).to(tl.int64)
        lo = tl.zeros((), tl.int64)
        hi = tl.zeros((), tl.int64)
    else:
        failed = ((lo < lower) | (hi >= upper)).to(tl.int64)
    row = table_ptr + slot_row * 5
    count = tl.load(table_ptr)
    keep = tl.load(row) != 0  # a failure already recorded is kept
    new = failed * (1 - keep.to(tl.int64))
    tl.store(row, tl.where(new != 0, 1, tl.load(row)))
    tl.store(row + 1, tl.where(new != 0, lo, tl.load(row + 1)))
    tl.store(row + 2, tl.where(new != 0, hi, tl.load(row + 2)))
    tl.store(row + 3, tl.where(new != 0, upper, tl.load(row + 3)))
    tl.store(row + 4, tl.where(new != 0, count, tl.load(row + 4)))
    tl.store(table_ptr, count + failed)


def tiles(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): whole rows, ~4096 elements a step."""
    block_c = triton.next_power_of_2(max(cols, 1))
    return max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_c)), block_c


@kernel_op("check_values_triton", mutates_args=("table",))
def check_values_triton(x: torch.Tensor, table: torch.Tensor, lower: int, upper: int, slot_row: int,
                        all_zero: bool) -> None:
    """Record in ``table`` (the device's checks table) whether 2-d ``x`` leaves [lower, upper)
    (``all_zero``: whether every value of ``x`` is 0)."""
    rows, cols = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dtype == torch.bool:
        x = x.view(torch.uint8)  # same bytes; Triton loads uint8 portably
    block_r, block_c = tiles(rows, cols)
    launch(_value_check_kernel)[(1,)](x, table, rows, cols, x.stride(0), lower, upper, slot_row,
                                      ALL_ZERO=all_zero, BLOCK_R=block_r, BLOCK_C=block_c)


@check_values_triton.register_fake
def _fake(x, table, lower, upper, slot_row, all_zero) -> None:
    return None
