"""Deferred index-range check in one launch (``sdae_fast.checks``): the Triton path of
``validate.check_index_range``.

The torch-op version of the check costs about ten tiny launches (aminmax, compares, the table
update); on the GPU those dominate a gather's host time. Here one program reads the (rows, cols)
index, takes its min and max, and, when a value lies outside [0, upper), writes the failure into
its row of the checks table (kept if one is already there) and bumps the table's failure count:
no host sync, one launch, the same table layout the torch path writes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdae_fast.library import kernel_op, launch

_BIG = tl.constexpr(2**62)


@triton.jit
def _index_check_kernel(index_ptr, table_ptr, rows, cols, stride_r, upper, slot_row,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    lo = tl.full((), _BIG, tl.int64)
    hi = tl.full((), -_BIG, tl.int64)
    c = tl.arange(0, BLOCK_C)
    for start in range(0, rows, BLOCK_R):
        r = start + tl.arange(0, BLOCK_R)
        ok = (r < rows)[:, None] & (c < cols)[None, :]
        v = tl.load(index_ptr + r[:, None].to(tl.int64) * stride_r + c[None, :], mask=ok, other=0).to(tl.int64)
        lo = tl.minimum(lo, tl.min(tl.min(tl.where(ok, v, _BIG), axis=1), axis=0))
        hi = tl.maximum(hi, tl.max(tl.max(tl.where(ok, v, -_BIG), axis=1), axis=0))
    failed = ((lo < 0) | (hi >= upper)).to(tl.int64)
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


@kernel_op("check_index_range_triton", mutates_args=("table",))
def check_index_range_triton(index: torch.Tensor, table: torch.Tensor, upper: int, slot_row: int) -> None:
    """Record in ``table`` (the device's checks table) whether ``index`` (2-d) leaves [0, upper)."""
    rows, cols = index.shape
    if index.stride(-1) != 1:
        index = index.contiguous()
    block_c = triton.next_power_of_2(max(cols, 1))
    block_r = max(1, min(triton.next_power_of_2(max(rows, 1)), 4096 // block_c))
    launch(_index_check_kernel)[(1,)](index, table, rows, cols, index.stride(0), upper, slot_row,
                                      BLOCK_R=block_r, BLOCK_C=block_c)


@check_index_range_triton.register_fake
def _fake(index, table, upper, slot_row) -> None:
    return None
