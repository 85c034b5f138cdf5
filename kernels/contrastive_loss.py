"""MixedAE's homologous contrastive loss (SPEC §4), flash-style: the (M, N, N) similarities never
reach device memory.

Forward, grid (M, anchor blocks): stream key blocks of the same image, ``sim = z_i·z_j / T`` by
``tl.dot`` over D-chunks, online logsumexp over keys j ≠ i, running sum of the positive (same label,
j ≠ i) similarities and their count. ``loss_i = lse_i − Σ_pos sim_ij / |P_i|``; anchors without a
positive contribute nothing; loss = mean over the valid anchors (0 when there are none).

Backward recomputes the similarity tiles (and, with normalisation, fuses its backward). With ``dsim_ij = (softmax_ij − [j∈P_i]/|P_i|) / n_valid``
for valid anchors i and the symmetric ``sim``, ``dz_i = (1/T) Σ_j (dsim_ij + dsim_ji) z_j`` — each
tile serves z_i both as anchor (row statistics of i) and as key (row statistics of j). Grid
(M, anchor blocks, D-chunks of the output) keeps the accumulator small at D = 768.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from sdae_fast.alloc import empty
from sdae_fast.library import kernel_op, launch, register_kernel_autograd


@triton.jit
def _sim_tile(z_base, rows_i, rows_j, i_ok, j_ok, D, stride_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """z_i · z_jᵀ for one (anchor block, key block), fp32 accumulation over D-chunks."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < D
        a = tl.load(z_base + rows_i[:, None] * stride_n + d[None, :], mask=i_ok[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(z_base + rows_j[:, None] * stride_n + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
    return acc


@triton.jit
def _inverse_norms(r_ptr, idx, ok, NORMALIZE: tl.constexpr):
    """1/||z|| per token when normalising (fp32, from PyTorch), else ones."""
    if NORMALIZE:
        return tl.load(r_ptr + idx, mask=ok, other=1.0)
    else:
        return tl.full(idx.shape, 1.0, tl.float32)


@triton.jit
def _contrastive_fwd_kernel(
    z_ptr, r_ptr, lab_ptr, lse_ptr, cnt_ptr, loss_ptr,
    N, D, stride_zm, stride_zn, stride_lm, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    NORMALIZE: tl.constexpr,
):
    img = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = rows_i < N
    z_base = z_ptr + img.to(tl.int64) * stride_zm
    lab_i = tl.load(lab_ptr + img * stride_lm + rows_i, mask=i_ok, other=-1)
    r_i = _inverse_norms(r_ptr, img * N + rows_i, i_ok, NORMALIZE)

    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.zeros([BLOCK_M], tl.float32)
    pos_sum = tl.zeros([BLOCK_M], tl.float32)
    pos_cnt = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = rows_j < N
        lab_j = tl.load(lab_ptr + img * stride_lm + rows_j, mask=j_ok, other=-1)
        r_j = _inverse_norms(r_ptr, img * N + rows_j, j_ok, NORMALIZE)
        dots = _sim_tile(z_base, rows_i, rows_j, i_ok, j_ok, D, stride_zn, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        sim = dots * r_i[:, None] * r_j[None, :] * inv_t
        keep = j_ok[None, :] & (rows_i[:, None] != rows_j[None, :])
        pos = keep & (lab_i[:, None] == lab_j[None, :])
        x = tl.where(keep, sim, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(x, axis=1))
        # A row may have seen no key yet (only itself): keep exp() away from (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_run = l_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), axis=1)
        m_run = m_new
        pos_sum += tl.sum(tl.where(pos, sim, 0.0), axis=1)
        pos_cnt += tl.sum(pos.to(tl.float32), axis=1)

    lse = m_run + tl.log(l_run)
    valid = pos_cnt > 0
    loss = tl.where(valid, lse - pos_sum / tl.maximum(pos_cnt, 1.0), 0.0)
    out = img * N + rows_i
    tl.store(lse_ptr + out, lse, mask=i_ok)
    tl.store(cnt_ptr + out, pos_cnt, mask=i_ok)
    tl.store(loss_ptr + out, loss, mask=i_ok)


@triton.jit
def _contrastive_bwd_kernel(
    z_ptr, r_ptr, r3_ptr, lab_ptr, lse_ptr, cnt_ptr, scale_ptr, p_ptr, dz_ptr,
    N, D, stride_zm, stride_zn, stride_lm, stride_dm, stride_dn, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_DO: tl.constexpr, SPLIT_W: tl.constexpr, ROW_SCALE: tl.constexpr,
):
    img = tl.program_id(0)
    rows_i = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    d_out = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    i_ok = rows_i < N
    do_ok = d_out < D
    z_base = z_ptr + img.to(tl.int64) * stride_zm
    lab_i = tl.load(lab_ptr + img * stride_lm + rows_i, mask=i_ok, other=-1)
    lse_i = tl.load(lse_ptr + img * N + rows_i, mask=i_ok, other=0.0)
    cnt_i = tl.load(cnt_ptr + img * N + rows_i, mask=i_ok, other=0.0)
    valid_i = cnt_i > 0
    inv_cnt_i = 1.0 / tl.maximum(cnt_i, 1.0)
    r_i = _inverse_norms(r_ptr, img * N + rows_i, i_ok, NORMALIZE)

    acc = tl.zeros([BLOCK_M, BLOCK_DO], tl.float32)
    dr_acc = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, N, BLOCK_N):
        rows_j = j0 + tl.arange(0, BLOCK_N)
        j_ok = rows_j < N
        lab_j = tl.load(lab_ptr + img * stride_lm + rows_j, mask=j_ok, other=-1)
        lse_j = tl.load(lse_ptr + img * N + rows_j, mask=j_ok, other=0.0)
        cnt_j = tl.load(cnt_ptr + img * N + rows_j, mask=j_ok, other=0.0)
        r_j = _inverse_norms(r_ptr, img * N + rows_j, j_ok, NORMALIZE)
        dots = _sim_tile(z_base, rows_i, rows_j, i_ok, j_ok, D, stride_zn, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION)
        sim = dots * r_i[:, None] * r_j[None, :] * inv_t
        keep = i_ok[:, None] & j_ok[None, :] & (rows_i[:, None] != rows_j[None, :])
        sim = tl.where(keep, sim, float("-inf"))  # the diagonal sim_ii may overflow exp(sim_ii - lse)
        pos = (keep & (lab_i[:, None] == lab_j[None, :])).to(tl.float32)
        # i as anchor (statistics of row i) and i as key of anchor j (statistics of row j; sim is symmetric).
        as_anchor = tl.where(keep & valid_i[:, None], tl.exp(sim - lse_i[:, None]) - pos * inv_cnt_i[:, None], 0.0)
        inv_cnt_j = 1.0 / tl.maximum(cnt_j, 1.0)
        as_key = tl.where(keep & (cnt_j > 0)[None, :], tl.exp(sim - lse_j[None, :]) - pos * inv_cnt_j[None, :], 0.0)
        z_j = tl.load(z_base + rows_j[:, None] * stride_zn + d_out[None, :], mask=j_ok[:, None] & do_ok[None, :],
                      other=0.0)
        w = as_anchor + as_key
        if NORMALIZE:
            # With zn = r·z, g_i = dL/dzn_i = Σ_j w_ij zn_j / T, the radial part zn_i·g_i / r_i is
            # Σ_j w_ij r_j z_i·z_j / T: a row sum over the full-D dots this program already has.
            dr_acc += tl.sum(w * tl.where(keep, dots, 0.0) * r_j[None, :], axis=1)
            w = w * r_j[None, :]
        w_hi = w.to(z_j.dtype)
        acc += tl.dot(w_hi, z_j, input_precision=PRECISION)
        if SPLIT_W:
            # 16-bit z: w rounded to 16 bits would lose ~3 digits, and Σ_j w_ij = 0 for an anchor
            # (softmax minus positives) so dz cancels; a second product with the rounding
            # remainder keeps w at ~fp32 precision on the tensor cores.
            acc += tl.dot((w - w_hi.to(tl.float32)).to(z_j.dtype), z_j, input_precision=PRECISION)

    scale = tl.load(scale_ptr) * inv_t  # grad_output / (n_valid · T), kept on the device: no host sync
    dz = acc * scale
    if NORMALIZE:
        # dL/dz_i = r_i g_i − r_i³ (z_i·g_i) z_i: the normalisation's backward, fused so dz is
        # rounded to its dtype once. r3 is 0 where the norm was clamped (F.normalize's eps).
        r3_i = tl.load(r3_ptr + img * N + rows_i, mask=i_ok, other=0.0)
        z_i = tl.load(z_base + rows_i[:, None] * stride_zn + d_out[None, :], mask=i_ok[:, None] & do_ok[None, :],
                      other=0.0).to(tl.float32)
        dz = (acc * r_i[:, None] - (r3_i * dr_acc)[:, None] * z_i) * scale
    if ROW_SCALE:
        # fp16 runs on zs = p·z (see _fp16_safe_scaling): dL/dz = p · dL/dzs, applied here in fp32,
        # before the one rounding: dL/dzs itself can be p times below fp16's normal range.
        dz = dz * tl.load(p_ptr + img * N + rows_i, mask=i_ok, other=1.0)[:, None]
    tl.store(dz_ptr + img.to(tl.int64) * stride_dm + rows_i[:, None] * stride_dn + d_out[None, :],
             dz.to(dz_ptr.dtype.element_ty), mask=i_ok[:, None] & do_ok[None, :])


def _blocks(n: int, d: int, z: torch.Tensor):
    # fp32 features: exact fp32 products (no tf32), as the reference computes.
    precision = "ieee" if z.dtype == torch.float32 else "tf32"
    if z.device.type == "cuda":
        return gpu_blocks(z.dtype)
    # Interpreter: few, large programs (each program costs Python time, not its width).
    return dict(BLOCK_M=32 if n <= 32 else 64, BLOCK_N=32 if n <= 32 else 64, BLOCK_D=32 if d <= 32 else 64,
                PRECISION=precision), 64, 1


def gpu_blocks(dtype: torch.dtype):
    """(constexprs, backward output D-chunk, warps) of a GPU launch: 64×64 similarity tiles that
    fit in registers without spilling (ptxas, sm_90). 16-bit: 8 warps, 64-wide D steps. fp32's exact
    (FMA) dot holds its operands in registers: at 8 warps with 32-wide D steps the forward needs all
    255 registers under Triton 3.8 and spills 8 B (forward) and 16 B (backward) under Triton 3.6, the
    GPU machine's; 16 warps and 16-wide steps need 128 and 112 (3.6), 110 and 92 (3.8)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=16, PRECISION="ieee"), 64, 16
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=64, PRECISION="tf32"), 128, 8


def _fp16_safe_scaling(z, r, r3):
    """The backward's w·r_j overflows fp16 for a tiny token (r = 1/||z|| up to 1.7e7), and that inf
    would reach every anchor of the image. The backward depends on z only through zn = r·z, so it
    runs on zs = p·z, r' = r/p (r3' = r3/p³) with p = r's power of two (>= 1): r' < 2 and p·z scales
    exactly (|p·z| <= |zn| <= 1). Returns (zs, r', r3', p); dL/dz = p · dL/dzs (the kernel applies p
    in fp32 before it rounds dz: ROW_SCALE)."""
    p = torch.frexp(r)[1].sub(1).clamp_min(0).to(torch.float32).exp2()
    zs = (z.to(torch.float32) * p[..., None]).to(torch.float16)
    return zs, r / p, r3 / (p * p * p), p


@kernel_op("homologous_contrastive_loss_triton")
def contrastive_loss_triton(z: torch.Tensor, labels: torch.Tensor, temperature: float, normalize: bool
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """(loss, r, r3, lse, cnt, n_valid): the loss of z (M, N, D) and what its backward reads. With
    ``normalize`` the L2 normalisation happens inside the products (fp32 inverse norms r scale the
    similarities), so 16-bit features stay exact; r and r3 are empty without it."""
    z = z.contiguous()
    labels = labels.contiguous()
    m, n, d = z.shape
    r = r3 = z  # placeholders, never read without normalize
    if normalize:
        norm = torch.linalg.vector_norm(z, dim=-1, dtype=torch.float32)
        r = norm.clamp_min(1e-12).reciprocal()  # F.normalize: z / max(||z||, 1e-12)
        r3 = torch.where(norm > 1e-12, r * r * r, 0.0)  # d r / d z vanishes where clamped
    blocks, block_do, warps = _blocks(n, d, z)
    lse = empty(m, n, dtype=torch.float32, device=z.device)
    cnt = empty(m, n, dtype=torch.float32, device=z.device)
    per_anchor = empty(m, n, dtype=torch.float32, device=z.device)
    grid = (m, triton.cdiv(n, blocks["BLOCK_M"]))
    launch(_contrastive_fwd_kernel)[grid](z, r, labels, lse, cnt, per_anchor, n, d, z.stride(0), z.stride(1),
                                          labels.stride(0), 1.0 / temperature, **blocks, NORMALIZE=normalize,
                                          num_warps=warps)
    n_valid = (cnt > 0).sum().to(torch.float32).clamp(min=1.0)
    if not normalize:
        r, r3 = z.new_empty(0, dtype=torch.float32), z.new_empty(0, dtype=torch.float32)
    return per_anchor.sum() / n_valid, r, r3, lse, cnt, n_valid


@contrastive_loss_triton.register_fake
def _contrastive_fake(z, labels, temperature, normalize):
    m, n, _ = z.shape
    f32 = dict(dtype=torch.float32)
    rows = (m, n) if normalize else (0,)
    return (z.new_empty((), **f32), z.new_empty(rows, **f32), z.new_empty(rows, **f32), z.new_empty(m, n, **f32),
            z.new_empty(m, n, **f32), z.new_empty((), **f32))


@kernel_op("homologous_contrastive_loss_triton_backward")
def contrastive_loss_triton_backward(grad_output: torch.Tensor, z: torch.Tensor, labels: torch.Tensor,
                                     r: torch.Tensor, r3: torch.Tensor, lse: torch.Tensor, cnt: torch.Tensor,
                                     n_valid: torch.Tensor, temperature: float, normalize: bool) -> torch.Tensor:
    """dz, fused with the backward of the normalisation."""
    z = z.contiguous()
    labels = labels.contiguous()
    if not normalize:
        r = r3 = z
    m, n, d = z.shape
    blocks, block_do, warps = _blocks(n, d, z)
    p = None
    if normalize and z.dtype == torch.float16:
        z, r, r3, p = _fp16_safe_scaling(z, r, r3)
    scale = (grad_output.to(torch.float32) / n_valid).reshape(1)
    dz = empty(m, n, d, dtype=z.dtype, device=z.device)
    grid = (m, triton.cdiv(n, blocks["BLOCK_M"]), triton.cdiv(d, block_do))
    launch(_contrastive_bwd_kernel)[grid](z, r, r3, labels, lse, cnt, scale, r if p is None else p, dz, n, d,
                                          z.stride(0), z.stride(1), labels.stride(0), dz.stride(0), dz.stride(1),
                                          1.0 / temperature, **blocks, NORMALIZE=normalize, BLOCK_DO=block_do,
                                          SPLIT_W=z.dtype != torch.float32, ROW_SCALE=p is not None, num_warps=warps)
    return dz


@contrastive_loss_triton_backward.register_fake
def _contrastive_backward_fake(grad_output, z, labels, r, r3, lse, cnt, n_valid, temperature, normalize):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _contrastive_setup(ctx, inputs, output):
    z, labels, temperature, normalize = inputs
    _, r, r3, lse, cnt, n_valid = output
    ctx.save_for_backward(z, labels, r, r3, lse, cnt, n_valid)
    ctx.temperature, ctx.normalize = temperature, normalize


def _contrastive_backward(ctx, grad_output, *_):
    z, labels, r, r3, lse, cnt, n_valid = ctx.saved_tensors
    dz = torch.ops.sdae_fast.homologous_contrastive_loss_triton_backward(
        grad_output, z, labels, r, r3, lse, cnt, n_valid, ctx.temperature, ctx.normalize)
    return dz, None, None, None


register_kernel_autograd(contrastive_loss_triton, _contrastive_backward, _contrastive_setup)


def homologous_contrastive_loss(z, labels, *, temperature=0.07, normalize=True):
    """Fused homologous contrastive loss; same contract as the reference (fp32 scalar)."""
    return torch.ops.sdae_fast.homologous_contrastive_loss_triton(z, labels, float(temperature), bool(normalize))[0]
