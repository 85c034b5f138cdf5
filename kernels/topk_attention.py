"""Top-K homologous attention (SPEC §3) in Triton: fused forward and backward.

Forward, one program per (BLOCK_M queries, b·h): scores against every key, the exact topk-th
largest score τ of each row (:mod:`kernels.topk_select`), then an online softmax over the kept keys
(s >= τ) and P@V. The (B, H, N, N) scores never reach device memory: when the padded row fits on
chip the selection runs on one register tile; beyond that each of the 32 selection passes
recomputes the score chunks (correct, slower). τ and the row log-sum-exp are saved so the backward
rebuilds exactly the forward's kept set and probabilities (flash-attention style recompute).

Backward: a preprocess writes D = rowsum(dO ∘ O); one kernel per key block loops over query blocks
for dK, dV; one per query block loops over key blocks for dQ. The kept set is a constant.

Scores are fp32: fp32 inputs use ``input_precision="ieee"`` (tf32 would change the kept set);
fp16/bf16 inputs use tensor-core dots with fp32 accumulation. Every score is computed with the same
dot orientation and head-dim tiling in every kernel, so the recomputed scores match the forward's.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sdae_fast.alloc import empty

from .topk_select import key_to_float, kth_largest_key, order_key

# The whole padded row is held as one register tile for the selection up to this many keys.
N_MAX_ONE_TILE = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _scores(q, k_base, stride_kn, start_n, N, scale, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """scale · q @ k[start_n : start_n + BLOCK_N]ᵀ in fp32, -inf on padding columns."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :],
                mask=(offs_n[:, None] < N) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    return tl.where(offs_n[None, :] < N, s, float("-inf"))


@triton.jit
def _select_threshold(q, k_base, stride_kn, N, topk, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      N_PAD: tl.constexpr, ONE_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                      HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    """τ per query row: the exact topk-th largest score (fp32)."""
    if ONE_TILE:
        s = _scores(q, k_base, stride_kn, 0, N, scale, N_PAD, BLOCK_D, HEAD_DIM, PRECISION)
        cols = tl.arange(0, N_PAD)
        keys = tl.where(cols[None, :] < N, order_key(s), 0)
        prefix = kth_largest_key(keys, topk, BLOCK_M)
    else:
        # Row too long for registers: each bit's count recomputes the score chunks.
        prefix = tl.zeros([BLOCK_M], dtype=tl.uint32)
        bit = tl.full([BLOCK_M], 0x80000000, dtype=tl.uint32)
        for _ in range(32):
            cand = prefix | bit
            count = tl.zeros([BLOCK_M], dtype=tl.int32)
            for start_n in range(0, N, BLOCK_N):
                s = _scores(q, k_base, stride_kn, start_n, N, scale, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
                cols = start_n + tl.arange(0, BLOCK_N)
                keys = tl.where(cols[None, :] < N, order_key(s), 0)
                count += tl.sum((keys >= cand[:, None]).to(tl.int32), axis=1)
            prefix = tl.where(count >= topk, cand, prefix)
            bit = bit >> 1
    return key_to_float(prefix)


@triton.jit
def _topk_attention_fwd(Q, K, V, O, TAU, LSE, N, H, topk, scale,
                        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_PAD: tl.constexpr,
                        ONE_TILE: tl.constexpr, SELECT: tl.constexpr, BLOCK_D: tl.constexpr,
                        HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = Q + b * sq_b + h * sq_h
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    if SELECT:
        tau = _select_threshold(q, k_base, sk_n, N, topk, scale, BLOCK_M, BLOCK_N, N_PAD, ONE_TILE,
                                BLOCK_D, HEAD_DIM, PRECISION)
    else:
        tau = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)

    # Online softmax over the kept keys; the row's top score is always kept, so l > 0 at the end.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        s = _scores(q, k_base, sk_n, start_n, N, scale, BLOCK_N, BLOCK_D, HEAD_DIM, PRECISION)
        s = tl.where(s >= tau[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no kept key yet: avoid -inf - -inf
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :],
                    mask=(offs_n[:, None] < N) & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_base = O + bh * N * HEAD_DIM
    tl.store(o_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(TAU + bh * N + offs_m, tau, mask=row_ok)
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
# Launchers
# ----------------------------------------------------------------------------------------------
def _fwd_configs():
    if _interpreting():  # one config: the interpreter runs each program in Python
        return [triton.Config({"BLOCK_M": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m}, num_warps=w, num_stages=s)
            for m in (16, 32, 64) for w in (4, 8) for s in (1, 2)]


def _prune_fwd(configs, named_args, **kwargs):
    # The one-tile selection holds BLOCK_M × N_PAD uint32 keys in registers: cap it per warp count.
    n_pad = named_args.get("N_PAD", kwargs.get("N_PAD"))
    one_tile = named_args.get("ONE_TILE", kwargs.get("ONE_TILE"))
    if not one_tile:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * n_pad <= 2048 * c.num_warps]
    return kept or configs[:1]


def _bwd_configs():
    if _interpreting():
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n in ((32, 64), (64, 64), (64, 128), (128, 64)) for w in (4, 8) for s in (1, 2)]


_fwd = triton.autotune(_fwd_configs(), key=["N_PAD", "BLOCK_D", "SELECT", "ONE_TILE", "PRECISION"],
                       prune_configs_by={"early_config_prune": _prune_fwd})(_topk_attention_fwd)

from .topk_attention_bwd import _topk_attention_bwd_dkdv, _topk_attention_bwd_dq  # noqa: E402

_bwd_dkdv = triton.autotune(_bwd_configs(), key=["N_PAD", "BLOCK_D", "PRECISION"])(_topk_attention_bwd_dkdv)
_bwd_dq = triton.autotune(_bwd_configs(), key=["N_PAD", "BLOCK_D", "PRECISION"])(_topk_attention_bwd_dq)


def _geometry(q):
    n, d = q.shape[-2], q.shape[-1]
    n_pad = max(16, triton.next_power_of_2(n))
    block_d = max(16, triton.next_power_of_2(d))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    return n, d, n_pad, block_d, precision


def _strides(*tensors):
    return [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]


def _forward(q, k, v, topk, scale):
    b, h = q.shape[:2]
    n, d, n_pad, block_d, precision = _geometry(q)
    select = topk < n
    one_tile = n_pad <= N_MAX_ONE_TILE
    # Softmax chunk: in the interpreter the whole row (identical dot shape to the selection tile,
    # so numpy's matmul gives bit-identical scores); on the GPU a chunk that keeps P@V on chip.
    if one_tile:
        block_n = n_pad if _interpreting() else min(n_pad, 128)
    else:
        block_n = 64 if _interpreting() else 128
    o = empty(b, h, n, d, dtype=q.dtype, device=q.device)
    tau = empty(b, h, n, dtype=torch.float32, device=q.device)
    lse = empty(b, h, n, dtype=torch.float32, device=q.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)  # noqa: E731
    _fwd[grid](q, k, v, o, tau, lse, n, h, min(topk, n), scale, *_strides(q, k, v),
               BLOCK_N=block_n, N_PAD=n_pad, ONE_TILE=one_tile, SELECT=select, BLOCK_D=block_d,
               HEAD_DIM=d, PRECISION=precision)
    return o, tau, lse


def _backward(q, k, v, o, do, tau, lse, scale):
    b, h = q.shape[:2]
    n, d, n_pad, block_d, precision = _geometry(q)
    do = do.contiguous()
    delta = empty(b, h, n, dtype=torch.float32, device=q.device)
    _topk_attention_bwd_delta[(triton.cdiv(n, 64), b * h)](o, do, delta, n, BLOCK_M=64, BLOCK_D=block_d,
                                                         HEAD_DIM=d)
    dq = empty(b, h, n, d, dtype=q.dtype, device=q.device)
    dk = empty(b, h, n, d, dtype=k.dtype, device=q.device)
    dv = empty(b, h, n, d, dtype=v.dtype, device=q.device)
    strides = _strides(q, k, v)
    _bwd_dkdv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h)](
        q, k, v, do, tau, lse, delta, dk, dv, n, h, scale, *strides,
        BLOCK_D=block_d, HEAD_DIM=d, PRECISION=precision, N_PAD=n_pad)
    _bwd_dq[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), b * h)](
        q, k, v, do, tau, lse, delta, dq, n, h, scale, *strides,
        BLOCK_D=block_d, HEAD_DIM=d, PRECISION=precision, N_PAD=n_pad)
    return dq, dk, dv


class TopKAttentionFunction(torch.autograd.Function):
    """Fused top-K attention; the backward reuses the forward's τ and log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, topk, scale):
        o, tau, lse = _forward(q, k, v, topk, scale)
        ctx.save_for_backward(q, k, v, o, tau, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, tau, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, o, do, tau, lse, ctx.scale)
        return dq, dk, dv, None, None


def topk_attention(q, k, v, topk: int, *, scale=None):
    """Triton top-K attention over validated (B, H, N, d) inputs (see ``sdae_fast.ops.topk_attention``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return TopKAttentionFunction.apply(q, k, v, topk, scale)
