"""Backward kernels of top-K attention: dK, dV per key block and dQ per query block.

Both recompute s = scale · q kᵀ exactly as the forward does (same dot orientation, same head-dim
tile), keep "not s < τ" (the forward's saved threshold) and rebuild P = exp(s - lse). Then
dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP - D), dQ = scale · dS K, dK = scale · dSᵀ Q.

NaN as the reference (autograd of softmax over the masked-filled scores): a row whose forward was
NaN (LSE NaN, or -inf for a row of -inf scores) has a softmax row NaN at every key, so dV is all
NaN; dS is exactly 0 off the kept set (masked_fill's gradient), even where dP - D is NaN (a NaN in
V or in a NaN row's D), and NaN on a NaN row's kept keys through P. P marks the dropped keys with
-0.0 (exp never returns it) so that dS can tell them apart without a mask live across two dots.
"""
import triton
import triton.language as tl


@triton.jit
def _probabilities(q, k, tau, tau_col, lse, offs_n, row_ok, col_ok, scale, PRECISION: tl.constexpr):
    """P on the forward's kept set (not s < τ, plus the boundary key itself), -0.0 elsewhere.

    "not s < τ" keeps NaN scores, and every key of a row whose τ is NaN, as the reference does."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    kept = (~(s < tau[:, None]) | (offs_n[None, :] == tau_col[:, None])) & row_ok[:, None] & col_ok[None, :]
    # A -0.0 literal would become +0.0 (Triton builds float constants equal to 0 as null values).
    neg_zero = tl.full([], 0x80000000, tl.uint32).to(tl.float32, bitcast=True)
    return tl.where(kept, tl.exp(s - lse[:, None]), neg_zero)


@triton.jit
def _score_grad(p, dp, delta):
    """dS = P ∘ (dP - D) on the kept set, exactly 0 off it (P = -0.0 there) even where dP - D is NaN."""
    dropped = p.to(tl.uint32, bitcast=True) == 0x80000000
    return tl.where(dropped, 0.0, p * (dp - delta[:, None]))


@triton.jit
def _topk_attention_bwd_dkdv(Q, K, V, DO, TAU, TAU_COL, LSE, DELTA, DK, DV, N, H, scale,
                             sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, N_PAD: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    q_base = Q + b * sq_b + h * sq_h
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < N
    d_ok = offs_d < HEAD_DIM
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * sk_b + h * sk_h + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * sv_b + h * sv_h + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    nan_rows = tl.zeros([BLOCK_M], dtype=tl.int32)  # query rows whose forward was NaN (LSE not finite)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        row_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :], mask=row_mask, other=0.0)
        do = tl.load(DO + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask,
                     other=0.0)
        tau = tl.load(TAU + bh * N + offs_m, mask=row_ok, other=0.0)
        tau_col = tl.load(TAU_COL + bh * N + offs_m, mask=row_ok, other=-1)
        lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
        nan_rows += (~(tl.abs(lse) < float("inf"))).to(tl.int32)
        p = _probabilities(q, k, tau, tau_col, lse, offs_n, row_ok, col_ok, scale, PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = _score_grad(p, dp, delta)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    # A NaN row's softmax is NaN at every key, kept or not: the reference's dV is NaN throughout.
    dv = tl.where(tl.max(nan_rows, axis=0) > 0, float("nan"), dv)
    out = bh * N * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _topk_attention_bwd_dq(Q, K, V, DO, TAU, TAU_COL, LSE, DELTA, DQ, N, H, scale,
                           sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr, N_PAD: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // H, bh % H
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = offs_d < HEAD_DIM
    row_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], mask=row_mask, other=0.0)
    tau = tl.load(TAU + bh * N + offs_m, mask=row_ok, other=0.0)
    tau_col = tl.load(TAU_COL + bh * N + offs_m, mask=row_ok, other=-1)
    lse = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * sk_n + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :], mask=kv_mask, other=0.0)
        p = _probabilities(q, k, tau, tau_col, lse, offs_n, row_ok, col_ok, scale, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = _score_grad(p, dp, delta)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    tl.store(DQ + bh * N * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=row_mask)
