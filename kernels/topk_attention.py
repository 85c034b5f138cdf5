"""Top-K homologous attention (SPEC §3) in Triton: fused forward and backward.

Forward, one program per (BLOCK_M queries, b·h): scores against every key, the exact topk-th
largest score τ of each row (:mod:`kernels.topk_select`), then an online softmax over the kept keys
(not s < τ) and P@V. The (B, H, N, N) scores never reach device memory: up to N_MAX_ONE_TILE keys
the selection runs on the row's keys held in registers (1, 2 or 4 tiles); beyond that each of the
32 selection passes recomputes the score chunks (correct, slower). τ, the first column holding τ
(the boundary key) and the row log-sum-exp are saved so the backward rebuilds the forward's kept
set and probabilities (flash-attention style recompute). NaN scores are kept, and give NaN rows
where the reference's do (see ``_attend`` and topk_attention_bwd).

Backward: a preprocess writes D = rowsum(dO ∘ O); one kernel per key block loops over query blocks
for dK, dV; one per query block loops over key blocks for dQ. The kept set is a constant.

Scores are fp32: fp32 inputs use ``input_precision="ieee"`` (tf32 would change the kept set) as
FMA dots over 16-wide head-dim chunks, so they do not spill (sm_90; fp32 rows past 256 keys are
refused, see ``why_not``); fp16/bf16 inputs use tensor-core dots with fp32 accumulation. Every
pass computes a score with the same dot orientation and head-dim tile. A pass whose dot shape
differs could still round the key at τ an ulp lower and drop it — so every pass keeps the boundary
key by column as well. Other keys would need a score within that rounding of τ: an fp32 near-tie
(ill-defined anyway), or an exact copy of the boundary key, which a differing pass drops. On the GPU
the passes share one dot code; the CPU interpreter's numpy dot rounds by tile shape, and there a
copy of the boundary key is lost in the backward (a GPU test checks duplicated keys on hardware).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sdae_fast.alloc import empty
from sdae_fast.library import kernel_op, launch, register_kernel_autograd

# FP32_MAX_N and why_not are part of this module's interface (ops/attention.py, tests).
from .topk_attention_configs import (BWD_CONFIGS, FP32_MAX_N, FWD_CONFIGS, _prune_bwd_dkdv,  # noqa: F401
                                     _prune_bwd_dq, _prune_fwd, why_not)
from .topk_select import key_to_float, kth_largest_key, order_key

# The whole padded row is held in registers for the selection up to this many keys, as 1, 2 or 4
# tiles of at most TILE_N keys (each score dot then stages only TILE_N keys in shared memory).
N_MAX_ONE_TILE = 1024
TILE_N = 256


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _scores(q, k_base, stride_kn, start_n, N, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """scale · q @ k[start_n : start_n + BLOCK_N]ᵀ in fp32, -inf on padding columns.

    ``q`` is the (BLOCK_M, BLOCK_D) query tile, except for exact fp32 ("ieee"): there it is the
    (BLOCK_M,) query row pointers and the dot runs over 16-wide head-dim chunks re-read from
    cache, since an FMA dot holds (rows + columns) × K operands per thread and whole rows spill.
    """
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if PRECISION == "ieee":
        s = tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32)
        for d0 in tl.static_range(0, BLOCK_D, 16):
            offs_d = d0 + tl.arange(0, 16)
            d_ok = offs_d < HEAD_DIM
            qc = tl.load(q[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
            kc = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                         mask=(offs_n[:, None] < N) & d_ok[None, :], other=0.0)
            s = tl.dot(qc, tl.trans(kc), s, input_precision=PRECISION)
        s = s * scale
    else:
        offs_d = tl.arange(0, BLOCK_D)
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                    mask=(offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    return tl.where(offs_n[None, :] < N, s, float("-inf"))


@triton.jit
def _keys(q, k_base, stride_kn, start_n, N, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
          HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Order keys of one score chunk; padding columns get key 0 (never counted)."""
    s = _scores(q, k_base, stride_kn, start_n, N, scale, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
    cols = start_n + tl.arange(0, BLOCK_N)
    return tl.where(cols[None, :] < N, order_key(s), 0)


@triton.jit
def _select_threshold(q, k_base, stride_kn, N, topk, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      TILE_N: tl.constexpr, NUM_TILES: tl.constexpr, ONE_TILE: tl.constexpr,
                      BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Per query row: the order key of the exact topk-th largest score, and the first column
    holding it (the boundary key, which every later pass keeps explicitly)."""
    if ONE_TILE:
        # The whole row stays in registers as NUM_TILES key tiles of TILE_N columns each.
        keys0 = _keys(q, k_base, stride_kn, 0, N, scale, TILE_N, BLOCK_D, HEAD_DIM, PRECISION)
        keys1 = keys0
        keys2 = keys0
        keys3 = keys0
        if NUM_TILES > 1:
            keys1 = _keys(q, k_base, stride_kn, TILE_N, N, scale, TILE_N, BLOCK_D, HEAD_DIM, PRECISION)
        if NUM_TILES > 2:
            keys2 = _keys(q, k_base, stride_kn, 2 * TILE_N, N, scale, TILE_N, BLOCK_D, HEAD_DIM, PRECISION)
            keys3 = _keys(q, k_base, stride_kn, 3 * TILE_N, N, scale, TILE_N, BLOCK_D, HEAD_DIM, PRECISION)
        prefix = kth_largest_key(keys0, keys1, keys2, keys3, topk, NUM_TILES, BLOCK_M)
        # The boundary key's column, read off the register tiles (no score recompute).
        col = _first_column(keys0, prefix, 0, TILE_N)
        if NUM_TILES > 1:
            col = tl.minimum(col, _first_column(keys1, prefix, TILE_N, TILE_N))
        if NUM_TILES > 2:
            col = tl.minimum(col, _first_column(keys2, prefix, 2 * TILE_N, TILE_N))
            col = tl.minimum(col, _first_column(keys3, prefix, 3 * TILE_N, TILE_N))
    else:
        # Row too long for registers: each bit's count recomputes the score chunks.
        prefix = tl.zeros([BLOCK_M], dtype=tl.uint32)
        bit = tl.full([BLOCK_M], 0x80000000, dtype=tl.uint32)
        for _ in range(32):
            cand = prefix | bit
            count = tl.zeros([BLOCK_M], dtype=tl.int32)
            for start_n in range(0, N, BLOCK_N):
                keys = _keys(q, k_base, stride_kn, start_n, N, scale, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
                count += tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1)
            prefix = tl.where(count >= topk, cand, prefix)
            bit = bit >> 1
        col = _threshold_column(q, k_base, stride_kn, N, prefix, scale, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM,
                                PRECISION)
    return prefix, col


@triton.jit
def _first_column(keys, prefix, start_n, TILE_N: tl.constexpr):
    cols = start_n + tl.arange(0, TILE_N)
    return tl.min(tl.where(keys == prefix[:, None], cols[None, :], 2147483647), axis=1)


@triton.jit
def _threshold_column(q, k_base, stride_kn, N, prefix, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """Per row: the first key whose score is τ. Every pass keeps it explicitly, so a recomputed
    score that rounds an ulp differently (another dot shape) can never drop the boundary key."""
    col = tl.full([BLOCK_M], 2147483647, dtype=tl.int32)
    for start_n in range(0, N, BLOCK_N):
        s = _scores(q, k_base, stride_kn, start_n, N, scale, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
        cols = start_n + tl.arange(0, BLOCK_N)
        hit = (order_key(s) == prefix[:, None]) & (cols[None, :] < N)
        col = tl.minimum(col, tl.min(tl.where(hit, cols[None, :], 2147483647), axis=1))
    return col


@triton.jit
def _topk_attention_fwd(Q, K, V, O, TAU, TAU_COL, LSE, N, H, topk, scale,
                        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr,
                        TILE_N: tl.constexpr, ONE_TILE: tl.constexpr, SELECT: tl.constexpr, BLOCK_D: tl.constexpr,
                        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, STAGE: tl.constexpr = 0):
    """STAGE 0: select and attend in one program. Long 16-bit rows split it (see fwd_stages):
    STAGE 1 only selects (small BLOCK_M: the row's keys sit in registers) and writes τ; STAGE 2
    reads τ and attends with 64-row tiles, so its two dots run on wgmma."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    if PRECISION == "ieee":  # row pointers (see _scores); rows past N read row N - 1, never stored
        q = q_base + tl.minimum(offs_m, N - 1) * sq_n
    else:
        q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)

    if SELECT and STAGE == 2:  # τ and the boundary key from the selection launch
        tau = tl.load(TAU + bh * N + offs_m, mask=row_ok, other=float("-inf"))
        tau_col = tl.load(TAU_COL + bh * N + offs_m, mask=row_ok, other=-1)
    elif SELECT:
        prefix, tau_col = _select_threshold(q, k_base, sk_n, N, topk, scale, BLOCK_M, BLOCK_N, TILE_N, N_PAD // TILE_N,
                                            ONE_TILE, BLOCK_D, HEAD_DIM, PRECISION)
        tau = key_to_float(prefix)
    else:
        tau = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        tau_col = tl.full([BLOCK_M], -1, dtype=tl.int32)
    if STAGE != 2:
        tl.store(TAU + bh * N + offs_m, tau, mask=row_ok)
        tl.store(TAU_COL + bh * N + offs_m, tau_col, mask=row_ok)
    if STAGE != 1:
        _attend(q, k_base, v_base, O, LSE, tau, tau_col, bh, offs_m, row_ok, N, scale, sk_n, sv_n,
                BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)


@triton.jit
def _attend(q, k_base, v_base, O, LSE, tau, tau_col, bh, offs_m, row_ok, N, scale, sk_n, sv_n,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
            PRECISION: tl.constexpr):
    """Softmax over the kept keys (not s < τ, and the boundary key) and P@V; writes O and the row LSE.

    NaN as the reference: "not s < τ" keeps NaN scores (and every key once τ itself is NaN), and
    the NaN rides l_i and acc (exp(NaN - m) is NaN) to the whole row of O and its LSE, while m_i
    may drop it (tl.max / tl.maximum ignore NaN by default). +inf gives exp(inf - inf) = NaN."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    # Online softmax over the kept keys; the row's top score is always kept, so l > 0 at the end
    # (a row of finite scores).
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        s = _scores(q, k_base, sk_n, start_n, N, scale, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kept = ~(s < tau[:, None]) | (offs_n[None, :] == tau_col[:, None])  # NaN s or τ: kept
        s = tl.where(kept, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept key yet: avoid -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :],
                    mask=(offs_n[:, None] < N) & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_base = O + bh * N * HEAD_DIM
    tl.store(o_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log(l_i), mask=row_ok)


@triton.jit
def _topk_attention_bwd_delta(O, DO, DELTA, N, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                              HEAD_DIM: tl.constexpr):
    """D = rowsum(dO ∘ O) in fp32 (O and dO are contiguous (B·H, N, d))."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < HEAD_DIM)
    offs = bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + bh * N + offs_m, tl.sum(o * do, axis=1), mask=offs_m < N)


# ----------------------------------------------------------------------------------------------
# Launchers. On the GPU block sizes are autotuned per (N, d); the interpreter gets one fixed
# geometry in which every pass computes its scores with the same dot shapes at the same offsets
# (BLOCK_M × TILE_N, or BLOCK_M × 64 chunks on long rows), so numpy's matmul returns bit-identical
# scores in each pass.
# ----------------------------------------------------------------------------------------------
INTERPRETER_BLOCK_M = 64
INTERPRETER_CHUNK = 64
# Tests set this to run the two-launch forward of long 16-bit rows (fwd_stages) in the interpreter.
INTERPRETER_TWO_STAGE = False
# Tests set this to give the backward another dot shape than the forward (as autotuning may on the
# GPU), which checks that the boundary key survives scores rounded differently.
INTERPRETER_BWD_CHUNK = None


def _chunks(n_pad):
    """(selection tile, softmax/backward chunk in the interpreter) for a padded row length."""
    one_tile = n_pad <= N_MAX_ONE_TILE
    tile_n = min(n_pad, TILE_N)
    return one_tile, tile_n, (tile_n if one_tile else INTERPRETER_CHUNK)


_fwd_tuned = triton.autotune(
    FWD_CONFIGS,
    key=["N_PAD", "BLOCK_D", "SELECT", "ONE_TILE", "PRECISION", "STAGE"],
    prune_configs_by={"early_config_prune": _prune_fwd})(_topk_attention_fwd)

from .topk_attention_bwd import _topk_attention_bwd_dkdv, _topk_attention_bwd_dq  # noqa: E402

_bwd_dkdv_tuned = triton.autotune(BWD_CONFIGS, key=["N_PAD", "BLOCK_D", "PRECISION"],
                                  prune_configs_by={"early_config_prune": _prune_bwd_dkdv})(_topk_attention_bwd_dkdv)
_bwd_dq_tuned = triton.autotune(BWD_CONFIGS, key=["N_PAD", "BLOCK_D", "PRECISION"],
                                prune_configs_by={"early_config_prune": _prune_bwd_dq})(_topk_attention_bwd_dq)


def _geometry(q):
    return _sizes(q.shape[-2], q.shape[-1], q.dtype)


def _sizes(n, d, dtype):
    n_pad = max(16, triton.next_power_of_2(n))
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if dtype == torch.float32 else "tf32"
    return n, d, n_pad, block_d, precision


def fwd_stages(n_pad: int, precision: str, select: bool) -> tuple[int, ...]:
    """Forward launches (kernel STAGE values). 16-bit rows of 512-1024 keys select in one launch
    (BLOCK_M 16-32: 64 × N_PAD keys would not fit in registers) and attend in another with
    BLOCK_M = 64, whose dots compile to wgmma instead of mma.sync; elsewhere one launch does both."""
    return (1, 2) if select and precision != "ieee" and 256 < n_pad <= N_MAX_ONE_TILE else (0,)


def launch_meta(n: int, d: int, dtype: torch.dtype):
    """The (forward, backward) constexprs a GPU launch at row length ``n`` and head dim ``d``
    uses, autotuned block sizes aside (forward also leaves SELECT to the call)."""
    _, _, n_pad, block_d, precision = _sizes(n, d, dtype)
    one_tile, tile_n, _ = _chunks(n_pad)
    # Softmax/P@V chunk: 128 keys keeps the V tile and P on chip next to the selection tile, 64
    # next to 128-wide head-dim tiles (128 spills 80 B in the 64-row attend stage). fp32: 32, or 16
    # next to 128-wide tiles (its FMA dot holds P's columns for every output column a thread owns).
    wide = block_d > 64
    block_n = (16 if wide else 32) if precision == "ieee" else (64 if wide else 128)
    fwd = dict(BLOCK_N=min(n_pad, block_n), N_PAD=n_pad, TILE_N=tile_n,
               ONE_TILE=one_tile, BLOCK_D=block_d, HEAD_DIM=d, PRECISION=precision)
    bwd = dict(BLOCK_D=block_d, HEAD_DIM=d, PRECISION=precision, N_PAD=n_pad)
    return fwd, bwd


def _strides(*tensors):
    return [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]


def _forward(q, k, v, topk, scale):
    b, h = q.shape[:2]
    n, d, n_pad, block_d, precision = _geometry(q)
    one_tile, tile_n, interpreter_chunk = _chunks(n_pad)
    o = empty(b, h, n, d, dtype=q.dtype, device=q.device)
    tau = empty(b, h, n, dtype=torch.float32, device=q.device)
    tau_col = empty(b, h, n, dtype=torch.int32, device=q.device)
    lse = empty(b, h, n, dtype=torch.float32, device=q.device)
    args = (q, k, v, o, tau, tau_col, lse, n, h, min(topk, n), scale, *_strides(q, k, v))
    meta = dict(N_PAD=n_pad, TILE_N=tile_n, ONE_TILE=one_tile, SELECT=topk < n, BLOCK_D=block_d, HEAD_DIM=d, PRECISION=precision)
    if _interpreting():
        grid = (triton.cdiv(n, INTERPRETER_BLOCK_M), b * h)
        stages = fwd_stages(n_pad, precision, topk < n) if INTERPRETER_TWO_STAGE else (0,)
        for stage in stages:
            launch(_topk_attention_fwd)[grid](*args, BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=interpreter_chunk,
                                              STAGE=stage, **meta)
    else:
        block_n = launch_meta(n, d, q.dtype)[0]["BLOCK_N"]
        for stage in fwd_stages(n_pad, precision, topk < n):
            launch(_fwd_tuned)[lambda m: (triton.cdiv(n, m["BLOCK_M"]), b * h)](*args, BLOCK_N=block_n, STAGE=stage,
                                                                                  **meta)
    return o, tau, tau_col, lse


def _backward(q, k, v, o, do, tau, tau_col, lse, scale):
    b, h = q.shape[:2]
    n, d, n_pad, block_d, precision = _geometry(q)
    do = do.contiguous()
    delta = empty(b, h, n, dtype=torch.float32, device=q.device)
    launch(_topk_attention_bwd_delta)[(triton.cdiv(n, 64), b * h)](o, do, delta, n, BLOCK_M=64, BLOCK_D=block_d,
                                                         HEAD_DIM=d)
    dq = empty(b, h, n, d, dtype=q.dtype, device=q.device)
    dk = empty(b, h, n, d, dtype=k.dtype, device=q.device)
    dv = empty(b, h, n, d, dtype=v.dtype, device=q.device)
    common = (q, k, v, do, tau, tau_col, lse, delta)
    rest = (n, h, scale, *_strides(q, k, v))
    meta = dict(BLOCK_D=block_d, HEAD_DIM=d, PRECISION=precision, N_PAD=n_pad)
    if _interpreting():
        block_n = INTERPRETER_BWD_CHUNK or _chunks(n_pad)[2]
        blocks = dict(BLOCK_M=INTERPRETER_BLOCK_M, BLOCK_N=block_n)
        launch(_topk_attention_bwd_dkdv)[(triton.cdiv(n, block_n), b * h)](*common, dk, dv, *rest, **blocks, **meta)
        launch(_topk_attention_bwd_dq)[(triton.cdiv(n, INTERPRETER_BLOCK_M), b * h)](*common, dq, *rest, **blocks, **meta)
    else:
        launch(_bwd_dkdv_tuned)[lambda m: (triton.cdiv(n, m["BLOCK_N"]), b * h)](*common, dk, dv, *rest, **meta)
        launch(_bwd_dq_tuned)[lambda m: (triton.cdiv(n, m["BLOCK_M"]), b * h)](*common, dq, *rest, **meta)
    return dq, dk, dv


@kernel_op("topk_attention_triton")
def topk_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, τ, boundary key, log-sum-exp): the fused forward and what its backward reuses."""
    return _forward(q, k, v, topk, scale)


@topk_attention_triton.register_fake
def _topk_fake(q, k, v, topk, scale):
    b, h, n, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty(b, h, n, dtype=torch.float32), q.new_empty(b, h, n, dtype=torch.int32),
            q.new_empty(b, h, n, dtype=torch.float32))


@kernel_op("topk_attention_triton_backward")
def topk_attention_triton_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                                   do: torch.Tensor, tau: torch.Tensor, tau_col: torch.Tensor, lse: torch.Tensor,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(q, k, v, o, do, tau, tau_col, lse, scale)


@topk_attention_triton_backward.register_fake
def _topk_backward_fake(q, k, v, o, do, tau, tau_col, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _topk_setup(ctx, inputs, output):
    q, k, v, _, scale = inputs
    o, tau, tau_col, lse = output
    ctx.save_for_backward(q, k, v, o, tau, tau_col, lse)
    ctx.scale = scale


def _topk_backward(ctx, do, *_):
    q, k, v, o, tau, tau_col, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.sdae_fast.topk_attention_triton_backward(q, k, v, o, do, tau, tau_col, lse, ctx.scale)
    return dq, dk, dv, None, None


register_kernel_autograd(topk_attention_triton, _topk_backward, _topk_setup)


def topk_attention(q, k, v, topk: int, *, scale=None):
    """Triton top-K attention over validated (B, H, N, d) inputs (see ``sdae_fast.ops.topk_attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return torch.ops.sdae_fast.topk_attention_triton(q, k, v, topk, scale)[0]
