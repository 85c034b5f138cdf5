"""Autotune configs of the top-K attention kernels, their pruning, and the shapes the Triton path
refuses. Every rule here is read off the offline sm_90 compile (``tests/test_sm90_static.py``,
``docs/kernels.md``): a config that spills, or that compiles a 16-bit dot at N <= 256 to mma.sync
instead of wgmma, is pruned, so the first call never compiles it."""
from __future__ import annotations

import torch
import triton

# fp32 ("ieee") backward tilings that ptxas keeps spill-free at every head dim (sm_90), under the
# Triton of CI (3.8) and of the GPU machine (3.6): FMA dots hold (rows + columns) × K operands per
# thread, so the tiles stay small. dK/dV's 16 × 64 tile took 255 registers at d 80-128 and spilled
# 16 B at d = 32 under Triton 3.6: 16 × 32 only (one config: fp32 compiles are slow to autotune).
_FP32_BWD = {"dkdv": ((16, 32),), "dq": ((32, 32), (16, 32))}

FWD_CONFIGS = [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=st)
               for m in (16, 32, 64) for w in (4, 8) for st in (1, 2)]
BWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n in ((32, 64), (64, 64), (64, 128), (128, 64)) for w in (4, 8) for st in (1, 2)] + \
              [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=8, num_stages=1)
               for m, n in sorted({tile for tiles in _FP32_BWD.values() for tile in tiles})]


def _arg(named_args, kwargs, name):
    return kwargs.get(name, named_args.get(name))


# Exact fp32 scores are FMA dots (over 16-wide head-dim chunks, see _scores): up to N_PAD 256 they
# do not spill, but next to the one-tile selection of N_PAD 512-1024 keys ptxas spills 10-18 KB a
# thread (sm_90), so fp32 rows longer than this go to the reference.
FP32_MAX_N = 256


def why_not(q, k, v) -> list[str]:
    """Reasons this kernel cannot serve these inputs on the GPU (the dispatcher falls back)."""
    from .gather_tokens import needs_wide_offsets

    reasons = []
    n = q.shape[-2]
    if q.is_cuda and q.dtype == torch.float32 and n > FP32_MAX_N:
        reasons.append(f"fp32 at N = {n} > {FP32_MAX_N}: exact fp32 score tiles spill registers on sm_90")
    b, h, _, d = q.shape
    if needs_wide_offsets(q, k, v) or b * h * n * d > 2**31 - 1:
        # Offsets are int32 (B·H·N·d of the outputs, strided qkv views of the inputs).
        reasons.append(f"element offsets pass 2^31 (B·H·N·d = {b * h * n * d}, int32 addressing)")
    return reasons


def _prune_fwd(configs, named_args, **kwargs):
    # fp32 dots in "ieee" precision run on FMA units; each config takes long to compile, so fp32
    # gets one small config instead of a search.
    if _arg(named_args, kwargs, "PRECISION") == "ieee":
        return [c for c in configs if c.kwargs["BLOCK_M"] == 16 and c.num_warps == 8 and c.num_stages == 1]
    if _arg(named_args, kwargs, "STAGE") == 2:  # attend only: 64-row tiles for wgmma
        return [c for c in configs if c.kwargs["BLOCK_M"] == 64 and c.num_warps == 8]
    if not _arg(named_args, kwargs, "ONE_TILE"):
        return configs
    # The one-tile selection holds BLOCK_M × N_PAD uint32 keys in registers: cap it per warp count
    # (halved next to 128-wide head-dim tiles on long rows, where ptxas spills otherwise).
    n_pad = _arg(named_args, kwargs, "N_PAD")
    per_warp = 2048 if n_pad <= 256 or _arg(named_args, kwargs, "BLOCK_D") <= 64 else 1024
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * n_pad <= per_warp * c.num_warps]
    if n_pad <= 256:
        # 64 query rows next to 128-wide head-dim tiles (d 80-128: Q and the fp32 output
        # accumulator) take all 255 registers at 4 warps, and spill 8-24 B under Triton 3.6.
        if _arg(named_args, kwargs, "BLOCK_D") > 64:
            kept = [c for c in kept if c.num_warps == 8]
        # wgmma (HGMMA) takes 64 rows per warp group: smaller BLOCK_M compiles to mma.sync. At
        # N_PAD 512-1024 BLOCK_M = 64 would need 256 key registers per thread (16 warps cap a
        # thread at 128 registers: 2.8 KB spills), so there the selection is a launch of its own
        # (STAGE 1, BLOCK_M 16-32 on mma.sync) and the attend launch (STAGE 2) takes wgmma.
        kept = [c for c in kept if c.kwargs["BLOCK_M"] >= 64]
    # Nothing fits (1024 keys next to 128-wide head-dim tiles): the fewest keys per thread.
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] / c.num_warps, c.num_stages))]


def _bwd_fits(c, block_d: int) -> bool:
    """Backward tiles (scores BM×BN, K/V or Q/dO BN×BD and BM×BD) per warp that ptxas (sm_90)
    keeps in registers; BLOCK_N = 128 spills at every warp count."""
    bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    return bn == 64 and bm >= 32 and (bm * bn + bn * block_d + bm * block_d) <= 3072 * c.num_warps


def _fp32_bwd(configs, kernel):
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) in _FP32_BWD[kernel]
            and c.num_warps == 8 and c.num_stages == 1]


def _prune_bwd_dkdv(configs, named_args, **kwargs):
    if _arg(named_args, kwargs, "PRECISION") == "ieee":
        return _fp32_bwd(configs, "dkdv")
    block_d = _arg(named_args, kwargs, "BLOCK_D")
    return [c for c in configs if _bwd_fits(c, block_d)] or configs[:1]


def _prune_bwd_dq(configs, named_args, **kwargs):
    if _arg(named_args, kwargs, "PRECISION") == "ieee":
        return _fp32_bwd(configs, "dq")
    block_d = _arg(named_args, kwargs, "BLOCK_D")
    # dQ's dots have BLOCK_M rows: 64 or more for wgmma.
    return [c for c in configs if _bwd_fits(c, block_d) and c.kwargs["BLOCK_M"] >= 64] or configs[:1]
