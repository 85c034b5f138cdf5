"""Exact per-row top-K threshold selection on fp32 scores, for Triton kernels.

A float's bit pattern, with the sign bit flipped for positives and every bit flipped for negatives,
is a uint32 whose unsigned order is the float order. Building the threshold key bit by bit from the
most significant bit — keep a bit when at least ``topk`` keys are >= the candidate — ends on the
largest key with >= topk keys at or above it: exactly the topk-th largest score, ties included.
Value bisection on floats would only approximate it; this takes 32 counting passes and is exact.

NaN ranks above +inf whatever its sign bit, as in ``torch.topk``: the reference's τ counts a NaN
score among the row's largest (and is NaN itself once a row holds topk or more NaNs).
"""
import triton
import triton.language as tl


@triton.jit
def order_key(s):
    """fp32 -> uint32 whose unsigned order matches the float order (-0 sorts just below +0); every
    NaN sorts above +inf, as torch.topk ranks it."""
    # A NaN of either sign becomes the positive quiet NaN, whose key 0xFFC00000 is above +inf's
    # 0xFF800000 (a NaN with the sign bit set, as x86 makes of inf · 0, would sort below -inf).
    bits = tl.where(s == s, s, float("nan")).to(tl.uint32, bitcast=True)
    negative = (bits >> 31) == 1
    return tl.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)


@triton.jit
def key_to_float(key):
    """Inverse of :func:`order_key` (a NaN comes back as the positive quiet NaN)."""
    bits = tl.where((key >> 31) == 1, key ^ 0x80000000, key ^ 0xFFFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _count_at_least(keys, cand):
    return tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1)


@triton.jit
def kth_largest_key(keys0, keys1, keys2, keys3, topk, NUM_TILES: tl.constexpr, BLOCK_M: tl.constexpr):
    """Per row: the topk-th largest key over 1, 2 or 4 register tiles (BLOCK_M, C) of uint32 keys.

    A row is split into tiles so that each score dot streams only C keys through shared memory;
    column order is irrelevant to counting. Unused tiles may be any tensor. Padding columns must
    hold key 0, which no candidate (always >= 1) counts.
    """
    prefix = tl.zeros([BLOCK_M], dtype=tl.uint32)
    bit = tl.full([BLOCK_M], 0x80000000, dtype=tl.uint32)
    for _ in range(32):
        cand = prefix | bit
        count = _count_at_least(keys0, cand)
        if NUM_TILES > 1:
            count += _count_at_least(keys1, cand)
        if NUM_TILES > 2:
            count += _count_at_least(keys2, cand) + _count_at_least(keys3, cand)
        prefix = tl.where(count >= topk, cand, prefix)
        bit = bit >> 1
    return prefix
