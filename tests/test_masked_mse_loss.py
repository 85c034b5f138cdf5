"""MAE's masked pixel loss (SPEC §4): the reference against hand values and MAE's official
``forward_loss``, the Triton kernel (interpreter on CPU) against the reference, forward and
gradient of pred."""

import pytest
import torch

import sdae_fast
from sdae_fast import reference
from sdae_fast.ops.masked_mse_loss import TRITON_MAX_PATCH, masked_mse_loss
from sdae_fast.testing import assert_close, triton_device, triton_dtypes, compile_for_hopper


def mae_official_loss(pred, target, mask, norm_pix_loss=True):
    """MAE's ``forward_loss`` re-derived from the official code (after patchify)."""
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.e-6) ** .5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


# ------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------
def test_reference_hand_values():
    pred = torch.zeros(1, 2, 3)
    target = torch.tensor([[[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]])
    mask = torch.tensor([[1.0, 0.0]])
    # Unnormalised: (1 + 4 + 9) / 3 on the one masked patch.
    assert reference.masked_mse_loss(pred, target, mask, norm_target=False).item() == pytest.approx(14 / 3)
    # [1, 2, 3] standardises to [-1, 0, 1] / sqrt(1 + 1e-6): mean square 2/3 / (1 + 1e-6).
    assert reference.masked_mse_loss(pred, target, mask).item() == pytest.approx(2 / 3 / (1 + 1e-6), rel=1e-6)
    # Both patches: the constant one standardises to 0, so its loss is 0.
    both = torch.ones(1, 2)
    assert reference.masked_mse_loss(pred, target, both).item() == pytest.approx(1 / 3 / (1 + 1e-6), rel=1e-6)


@pytest.mark.parametrize("norm_target", [True, False])
def test_reference_matches_mae_official(norm_target):
    pred = torch.randn(3, 16, 48, dtype=torch.float64)
    target = torch.rand(3, 16, 48, dtype=torch.float64) * 4 - 1
    mask = (torch.rand(3, 16) < 0.75).double()
    torch.testing.assert_close(reference.masked_mse_loss(pred, target, mask, norm_target=norm_target),
                               mae_official_loss(pred, target, mask, norm_target))


# ------------------------------------------------------------------------------------------
# Triton against the reference
# ------------------------------------------------------------------------------------------
def _mask(B, L, kind, device, ratio=0.75):
    m = torch.rand(B, L, device=device) < ratio
    m.view(-1)[0] = True  # never empty
    return {"bool": m, "float": m.float(), "half": m.half(), "int": m.long(), "uint8": m.to(torch.uint8)}[kind]


def _compare(pred, target, mask, norm_target):
    loss = masked_mse_loss(pred, target, mask, norm_target=norm_target, backend="triton")
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    expected = reference.masked_mse_loss(pred64, target.double(), mask, norm_target=norm_target)
    expected.backward()
    P = pred.shape[-1]
    rows = int((mask != 0).sum())
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # Same dtype-rounded inputs on both sides; fp32 sums of P terms per patch, then of the rows.
    assert_close(loss, expected, dtype=torch.float32, reduction=P * rows, name="loss")
    # Per element: the target's mean and variance sum P terms; rounded to pred's dtype.
    assert pred.grad.dtype == pred.dtype
    assert_close(pred.grad, pred64.grad, dtype=pred.dtype, reduction=P, name="grad pred")
    return loss


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("norm_target", [True, False])
@pytest.mark.parametrize("shape", [(2, 16, 48), (3, 7, 50), (2, 5, 3), (1, 3, 1), (2, 49, 768)])
def test_triton_matches_reference(shape, norm_target, dtype):
    device = triton_device()
    pred = torch.randn(shape, device=device).to(dtype).requires_grad_()
    target = (torch.rand(shape, device=device) * 4 - 1).to(dtype)
    _compare(pred, target, _mask(*shape[:2], "bool", device), norm_target)


@pytest.mark.parametrize("kind", ["bool", "float", "half", "int", "uint8"])
def test_triton_mask_dtypes(kind):
    device = triton_device()
    pred = torch.randn(3, 10, 48, device=device, requires_grad=True)
    target = torch.randn(3, 10, 48, device=device)
    _compare(pred, target, _mask(3, 10, kind, device), True)


@pytest.mark.parametrize("norm_target", [True, False])
def test_triton_all_masked_and_single_masked(norm_target):
    device = triton_device()
    pred = torch.randn(2, 9, 50, device=device, requires_grad=True)
    target = torch.randn(2, 9, 50, device=device)
    _compare(pred, target, torch.ones(2, 9, device=device), norm_target)
    pred.grad = None
    single = torch.zeros(2, 9, dtype=torch.bool, device=device)
    single[1, 4] = True
    _compare(pred, target, single, norm_target)
    # Only the masked patch gets a gradient; every other row is written as exact zeros.
    assert pred.grad[1, 4].abs().sum() > 0
    pred.grad[1, 4] = 0
    assert torch.equal(pred.grad, torch.zeros_like(pred.grad))


def test_triton_grad_scales_with_upstream_and_skips_target():
    device = triton_device()
    pred = torch.randn(8, 3, 48, device=device).transpose(0, 1).requires_grad_()  # non-contiguous
    target = torch.randn(3, 8, 48, device=device, requires_grad=True)
    mask = _mask(3, 8, "float", device)
    (0.5 * masked_mse_loss(pred, target, mask, backend="triton")).backward()
    pred64 = pred.detach().double().requires_grad_()
    (0.5 * reference.masked_mse_loss(pred64, target.detach().double(), mask)).backward()
    assert_close(pred.grad, pred64.grad, dtype=torch.float32, reduction=48)
    assert target.grad is None


def test_triton_fp16_small_gradients_survive_a_grad_scaler():
    # Σmask = 1024 patches of 48: the unit-upstream gradient 2(p - t)/(P·Σmask) ≈ 4e-5 is in
    # fp16's subnormals; GradScaler's 2^16 upstream must scale it before the fp16 rounding, as
    # autograd of the reference does, not after.
    device = triton_device()
    pred = torch.randn(16, 64, 48, device=device).half().requires_grad_()
    target = torch.randn(16, 64, 48, device=device).half()
    mask = torch.ones(16, 64, device=device)
    (65536.0 * masked_mse_loss(pred, target, mask, backend="triton")).backward()
    pred64 = pred.detach().double().requires_grad_()
    (65536.0 * reference.masked_mse_loss(pred64, target.double(), mask)).backward()
    assert_close(pred.grad, pred64.grad, dtype=torch.float16, reduction=48)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_triton_fp16_large_differences_do_not_overflow(P):
    # |p - t| = 1.2e5 over Σmask = 64 patches: the unit-upstream gradient 2(p - t)/(P·Σmask) is
    # finite in fp16 (≤ 3750), but 2(p - t)/P (the gradient without the mean's 1/Σmask) is not.
    device = triton_device()
    pred = torch.full((4, 16, P), 6e4, device=device).half().requires_grad_()
    target = torch.full((4, 16, P), -6e4, device=device).half()
    with torch.no_grad():
        pred[1] = torch.randn(16, P, device=device)  # ordinary patches next to the extreme ones
    _compare(pred, target, torch.ones(4, 16, device=device), False)


def test_triton_fp16_large_count_mixed_magnitudes_under_a_grad_scaler():
    # Σmask = 2048 patches of 8 whose |p - t| spans ~1e-3..1e-2: the unit gradients
    # 2(p - t)/(P·Σmask) (~1e-7..1e-6) are deep in fp16's subnormals, so the mean's 1/Σmask folded into
    # an fp16 store would lose them before GradScaler's 2^16 upstream; the reference scales in fp32
    # and rounds once. The magnitudes differ per patch: one scale for the whole tensor would not do.
    device = triton_device()
    target = torch.randn(4, 512, 8, device=device).half()
    offset = torch.randn(4, 512, 8, device=device) * 10.0 ** (torch.rand(4, 512, 1, device=device) - 3)
    pred = (target + offset).half().requires_grad_()
    mask = torch.ones(4, 512, device=device)
    (65536.0 * masked_mse_loss(pred, target, mask, norm_target=False, backend="triton")).backward()
    pred64 = pred.detach().double().requires_grad_()
    (65536.0 * reference.masked_mse_loss(pred64, target.double(), mask, norm_target=False)).backward()
    assert pred.grad.dtype == torch.float16
    assert_close(pred.grad, pred64.grad, dtype=torch.float16, reduction=8, name="grad pred")


def test_triton_mixed_dtypes():
    # MAE under autocast: fp16 decoder output against the fp32 patchified image.
    device = triton_device()
    pred = torch.randn(2, 8, 48, device=device).half().requires_grad_()
    target = torch.rand(2, 8, 48, device=device)
    _compare(pred, target, _mask(2, 8, "float", device), True)


def test_triton_without_grad():
    device = triton_device()
    pred, target = torch.randn(2, 5, 12, device=device), torch.randn(2, 5, 12, device=device)
    mask = _mask(2, 5, "bool", device)
    loss = masked_mse_loss(pred, target.requires_grad_(), mask, backend="triton")
    assert loss.grad_fn is None and not loss.requires_grad  # target is a constant
    assert_close(loss, reference.masked_mse_loss(pred.double(), target.double(), mask), dtype=torch.float32,
                 reduction=120)


def test_triton_fp16_constant_and_large_patches_stay_finite():
    # A constant patch standardises to 0 (var 0 + eps); large raw pixels stay finite in fp32 math.
    device = triton_device()
    pred = torch.randn(2, 4, 48, device=device).half().requires_grad_()
    target = (torch.randn(2, 4, 48, device=device) * 1e4).clamp(-6e4, 6e4).half()
    target[0, 0] = 7.0
    loss = _compare(pred, target, torch.ones(2, 4, device=device), True)
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_kernel_compiles_for_hopper():
    signature = {"pred_ptr": "*bf16", "target_ptr": "*bf16", "mask_ptr": "*u8", "mask_sum_ptr": "*fp32",
                 "grad_ptr": "*bf16", "scale_ptr": "*fp32", "partial_ptr": "*fp32", "num_rows": "i32", "P": "i32", "inv_p": "fp32",
                 "inv_p_minus_1": "fp32", "NORM_TARGET": "constexpr", "WRITE_GRAD": "constexpr",
                 "ROW_SCALE": "constexpr", "BLOCK_R": "constexpr", "BLOCK_P": "constexpr"}
    variants = [{"NORM_TARGET": True, "WRITE_GRAD": True, "ROW_SCALE": per_row, "BLOCK_R": 4, "BLOCK_P": 1024}
                for per_row in (False, True)]
    compile_for_hopper("sdae_fast.kernels.masked_mse_loss", "_masked_mse_fwd_kernel", signature, variants, num_warps=8)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
def test_validation_errors(checks_mode):
    x = torch.randn(2, 3, 4)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match="share one shape"):
        masked_mse_loss(x, torch.randn(2, 3, 5), m)
    with pytest.raises(ValueError, match="mask must have shape"):
        masked_mse_loss(x, x, torch.ones(3, 2))
    with pytest.raises(ValueError, match="3 dimensions"):
        masked_mse_loss(x[0], x[0], m)
    with pytest.raises(TypeError, match="dtype"):
        masked_mse_loss(x.long(), x.long(), m)
    with pytest.raises(TypeError, match="mask must have dtype"):
        masked_mse_loss(x, x, m.to(torch.complex64))
    with pytest.raises(ValueError, match="masked_mse_loss: mask selects no patch"):
        masked_mse_loss(x, x, torch.zeros(2, 3))
        sdae_fast.check_errors()
    with pytest.raises(ValueError, match="selects no patch"):
        masked_mse_loss(torch.randn(2, 3, 0), torch.randn(2, 3, 0), m)


def test_triton_refuses_patches_longer_than_a_tile():
    x = torch.randn(1, 1, TRITON_MAX_PATCH + 1)
    with pytest.raises(sdae_fast.BackendUnavailable, match="registers"):
        masked_mse_loss(x, x, torch.ones(1, 1), backend="triton")


# ------------------------------------------------------------------------------------------
# GPU: bf16 and MAE's real shapes
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("norm_target", [True, False])
def test_gpu_mae_shapes(dtype, norm_target):
    pred = torch.randn(64, 196, 768, device="cuda").to(dtype).requires_grad_()
    target = torch.rand(64, 196, 768, device="cuda").to(dtype)
    _compare(pred, target, _mask(64, 196, "float", "cuda"), norm_target)
    pred.grad = None
    _compare(pred, target, _mask(64, 196, "bool", "cuda"), norm_target)
