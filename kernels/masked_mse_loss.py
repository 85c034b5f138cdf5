"""MAE's masked pixel loss in one pass (SPEC §4): loss and d loss / d pred together.

pred, target (B, L, P) are viewed as R = B·L rows of P pixels. A program owns BLOCK_R whole rows.
Rows whose mask is 0 (the 25% of patches MAE keeps visible) contribute nothing and get a zero
gradient, so their pred/target are never loaded: the loads are predicated on the mask, which
saves that share of the input bandwidth.

The normaliser Σmask is computed on the device and read by the kernel through a pointer, so the
gradient ``2 (p - t) · m / (P · Σmask)`` is final in the forward without a device->host sync.
For fp16 each row is stored times its own power of two, whose inverse the backward applies
(see loss_grad).
"""
import torch
import triton
import triton.language as tl

from ..alloc import empty
from ..dispatch import triton_interpreting
from ..library import kernel_op, launch, register_saved_grad_autograd
from .loss_grad import pow2_normalizer, scale_saved_grad, scales_per_vector
from .row_stats import standardize_along

NORM_PIX_EPS = tl.constexpr(1e-6)  # MAE's norm_pix_loss: (t - mean) / (var + 1e-6) ** .5
MAX_BLOCK_P = 16384  # a whole patch lives in registers; longer rows are refused by the op's why_not


@triton.jit
def _masked_mse_fwd_kernel(
    pred_ptr, target_ptr, mask_ptr, mask_sum_ptr, grad_ptr, scale_ptr, partial_ptr,
    num_rows, P, inv_p, inv_p_minus_1,
    NORM_TARGET: tl.constexpr, WRITE_GRAD: tl.constexpr, ROW_SCALE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    row = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col = tl.arange(0, BLOCK_P)
    row_ok = row < num_rows
    col_ok = col < P
    weight = tl.load(mask_ptr + row, mask=row_ok, other=0).to(tl.float32)
    needed = row_ok & (weight != 0.0)
    valid = needed[:, None] & col_ok[None, :]
    offs = row[:, None] * P + col[None, :]

    p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if NORM_TARGET:
        t = standardize_along(t, valid, inv_p, inv_p_minus_1, NORM_PIX_EPS, 1)
    diff = tl.where(valid, p - t, 0.0)
    row_loss = tl.sum(diff * diff, axis=1) * inv_p
    tl.store(partial_ptr + pid, tl.sum(row_loss * weight, axis=0))

    if WRITE_GRAD:
        # Every row is written, the skipped ones with zeros (diff is 0 there).
        row_scale = (2.0 * inv_p / tl.load(mask_sum_ptr)) * weight
        grad = diff * row_scale[:, None]
        if ROW_SCALE:  # fp16: each row's max |grad| to [2^14, 2^15), the inverse saved (see loss_grad)
            up, down = pow2_normalizer(tl.max(tl.abs(grad), axis=1))
            grad = grad * up[:, None]
            tl.store(scale_ptr + row, down, mask=row_ok)
        tl.store(grad_ptr + offs, grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _launch_config(num_rows: int, P: int):
    block_p = triton.next_power_of_2(P)
    tile = 1 << 16 if triton_interpreting() else 4096
    block_r = min(triton.next_power_of_2(num_rows), max(1, tile // block_p))
    elements = block_p * block_r
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_r, block_p, num_warps


def masked_mse_forward(pred, target, mask, norm_target: bool, write_grad: bool):
    """(fp32 scalar loss, grad w.r.t. pred or None, its per-row fp32 factor (B, L, 1) or None).

    The grad is for a unit upstream gradient. For fp16 pred each row of it is stored times a power
    of two whose inverse the factor holds (see loss_grad); otherwise it is final and the factor is None.
    """
    B, L, P = pred.shape
    num_rows = B * L
    p = pred.contiguous()
    t = target.detach().contiguous()
    m = mask.detach().reshape(num_rows).contiguous()
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes; Triton loads uint8 portably
    mask_sum = m.sum(dtype=torch.float32)  # on the device: no sync; exact for 0/1 masks
    block_r, block_p, num_warps = _launch_config(num_rows, P)
    per_row = write_grad and scales_per_vector(pred.dtype)
    grid = triton.cdiv(num_rows, block_r)
    grad = empty(B, L, P, dtype=pred.dtype, device=pred.device) if write_grad else p
    scale = empty(B, L, 1, dtype=torch.float32, device=pred.device) if per_row else p  # unread without
    partials = empty(grid, dtype=torch.float32, device=pred.device)
    launch(_masked_mse_fwd_kernel)[(grid,)](
        p, t, m, mask_sum, grad, scale, partials,
        num_rows, P, 1.0 / P, 1.0 / max(P - 1, 1),
        NORM_TARGET=bool(norm_target), WRITE_GRAD=write_grad, ROW_SCALE=per_row,
        BLOCK_R=block_r, BLOCK_P=block_p, num_warps=num_warps,
    )
    loss = partials.sum() / mask_sum  # deterministic: per-program partials, no atomics
    return loss, (grad if write_grad else None), (scale if per_row else None)


@kernel_op("masked_mse_loss_triton")
def masked_mse_loss_triton(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_target: bool,
                           write_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss / d pred for a unit upstream gradient or empty, the factor it still lacks:
    fp16's per-row inverse powers of two, else a 0-dim 1)."""
    loss, grad, factor = masked_mse_forward(pred, target, mask, norm_target, write_grad)
    return (loss, pred.new_empty(0) if grad is None else grad,
            torch.ones((), dtype=torch.float32, device=pred.device) if factor is None else factor)


@masked_mse_loss_triton.register_fake
def _masked_mse_fake(pred, target, mask, norm_target, write_grad):
    f32 = torch.float32
    factor_shape = (*pred.shape[:2], 1) if write_grad and scales_per_vector(pred.dtype) else ()
    return (pred.new_empty((), dtype=f32), pred.new_empty(pred.shape if write_grad else (0,)),
            pred.new_empty(factor_shape, dtype=f32))


register_saved_grad_autograd(masked_mse_loss_triton, scale_saved_grad)


def masked_mse_loss(pred, target, mask, *, norm_target: bool = True):
    """Triton backend of :func:`sdae_fast.ops.masked_mse_loss`."""
    # target is a constant (SPEC §4): detached here, so a target that requires grad neither makes
    # the loss differentiable when pred is not, nor reaches the backward.
    write_grad = torch.is_grad_enabled() and pred.requires_grad
    return torch.ops.sdae_fast.masked_mse_loss_triton(pred, target.detach(), mask.detach(), norm_target, write_grad)[0]
