"""Multi-tensor EMA update in Triton: every (teacher, student) pair of a dtype group in one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdae_fast.multi_tensor import BLOCK_ELEMS, momentum_args

# No FMA contraction: the reference rounds m·t, (1 − m)·s and their sum separately (as the CUDA
# kernel does with __fmul_rn/__fadd_rn); an FFMA rounds once and puts results ulps away from it.
LAUNCH_OPTIONS = dict(num_warps=8, enable_fp_fusion=False)
_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _ema_kernel(t_ptrs, s_ptrs, numels, block_tensor, block_start, m_ptr, m, one_minus_m,
                T_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, M_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    pair = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + pair)
    t_ptr = tl.load(t_ptrs + pair).to(tl.pointer_type(T_DTYPE))
    s_ptr = tl.load(s_ptrs + pair).to(tl.pointer_type(S_DTYPE))
    if M_ON_DEVICE:
        mm = tl.load(m_ptr)  # the pair [m, 1 - m] of multi_tensor.momentum_args
        om = tl.load(m_ptr + 1)
    else:
        mm = m
        om = one_minus_m
    if ALIGNED:  # true by construction of the group: lets the compiler emit 16-byte loads/stores
        t_ptr = tl.multiple_of(t_ptr, 16)
        s_ptr = tl.multiple_of(s_ptr, 16)
        start = tl.multiple_of(start, BLOCK)
    offs = start + tl.arange(0, BLOCK)  # int64: a tensor may pass 2^31 elements
    if start + BLOCK <= n:  # a full block: no mask, so the loads can be vectorised
        t = tl.load(t_ptr + offs).to(tl.float32)
        s = tl.load(s_ptr + offs).to(tl.float32)
        tl.store(t_ptr + offs, (mm * t + om * s).to(T_DTYPE))
    else:
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask).to(tl.float32)
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
        tl.store(t_ptr + offs, (mm * t + om * s).to(T_DTYPE), mask=mask)


def launch(groups, momentum) -> None:
    """One launch per (teacher dtype, student dtype, alignment) group, over the block tables of
    ``sdae_fast.multi_tensor.pair_groups``."""
    if not groups:
        return
    m, one_minus_m, m_tensor = momentum_args(momentum, groups[0].t_ptrs.device)
    for g in groups:
        _ema_kernel[(g.num_blocks,)](
            g.t_ptrs, g.s_ptrs, g.numels, g.block_tensor, g.block_start,
            m_tensor if m_tensor is not None else g.numels, m, one_minus_m,
            T_DTYPE=_TL_DTYPES[g.t_dtype], S_DTYPE=_TL_DTYPES[g.s_dtype],
            M_ON_DEVICE=m_tensor is not None, ALIGNED=g.aligned, BLOCK=BLOCK_ELEMS, **LAUNCH_OPTIONS)
