"""SdAE's cosine loss (SPEC §4): the reference against hand values and SdAE's official formula, the
Triton kernel (interpreter on CPU) against the reference, forward and gradient of pred."""
import math


import pytest
import torch
import torch.nn.functional as F

import sdae_fast
from sdae_fast import reference
from sdae_fast.ops.cosine_loss import TRITON_MAX_VECTOR, cosine_loss
from sdae_fast.testing import assert_close, triton_device, triton_dtypes, compile_for_hopper


def standardized_along(target, dim, eps=1e-6):
    """The target standardised along ``dim`` with torch's unbiased var and eps 1e-6 under the root."""
    mean = target.mean(dim, keepdim=True)
    var = target.var(dim, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def sdae_official_loss(pred, target, dim, standardize_dim=None):
    """``1 - F.cosine_similarity(pred, standardized(target), dim=dim).mean()``."""
    target = standardized_along(target, dim if standardize_dim is None else standardize_dim)
    return 1 - F.cosine_similarity(pred, target, dim=dim).mean()


def sdae_official_loss_fold_by_fold(pred, target):
    """SdAE's official loss on (B·F, M, D), written out per fold from AbrahamYabo/SdAE
    engine_pretrain.py (train_one_epoch_ema): every teacher token is standardised over its D
    features (``var(dim=-1)`` unbiased, ``(var + 1e-6) ** .5``); then ``F.cosine_similarity`` with
    its default dim=1 compares, for every fold row r and feature d, the M-vector of student
    predictions with the M-vector of standardised teacher values (the token axis), eps 1e-8 on
    each norm; the loss is 1 minus the mean of those B·F·D cosines. float64, explicit loops."""
    rows, m, d = pred.shape
    total = torch.zeros((), dtype=torch.float64)
    for r in range(rows):
        t = target[r].double()  # (M, D): the fold's teacher tokens
        t = (t - t.mean(1, keepdim=True)) / (t.var(1, keepdim=True) + 1e-6).sqrt()
        p = pred[r]
        for j in range(d):
            a, b = p[:, j], t[:, j]  # one feature across the fold's tokens
            total = total + (a * b).sum() / (a.norm().clamp_min(1e-8) * b.norm().clamp_min(1e-8))
    return 1 - total / (rows * d)


# ------------------------------------------------------------------------------------------
# The reference
# ------------------------------------------------------------------------------------------
def test_reference_hand_values():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # cos = 1 and 0.
    assert reference.cosine_loss(pred, target, standardize_target=False).item() == pytest.approx(0.5)
    # [1, 0] standardises to ±0.5 / sqrt(0.5 + eps) ≈ [0.707, -0.707]: cos = +0.707 and -0.707.
    assert reference.cosine_loss(pred, target).item() == pytest.approx(1.0, abs=1e-6)
    assert reference.cosine_loss(torch.tensor([[3.0, 4.0]]), torch.tensor([[6.0, 8.0]]),
                                 standardize_target=False).item() == pytest.approx(0.0, abs=1e-7)
    # Along dim=0 the vectors are the columns: ([1, 0], [1, 1]) and ([0, 1], [0, 0]).
    assert reference.cosine_loss(pred, target, dim=0, standardize_target=False).item() == pytest.approx(
        1 - (1 / math.sqrt(2) + 0) / 2)


@pytest.mark.parametrize("shape,dim", [((6, 7, 33), -1), ((6, 7, 33), 1), ((6, 7, 33), 0), ((4, 49, 16), 1)])
def test_reference_matches_sdae_official(shape, dim):
    pred = torch.randn(shape, dtype=torch.float64)
    target = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    torch.testing.assert_close(reference.cosine_loss(pred, target, dim=dim, standardize_dim=dim),
                               sdae_official_loss(pred, target, dim))


@pytest.mark.parametrize("shape,dim,standardize_dim", [((6, 7, 33), 1, -1), ((6, 7, 33), 0, 2), ((6, 7, 33), -1, 1),
                                                       ((4, 49, 16), 1, 2), ((3, 5, 2, 3), 2, 0)])
def test_reference_independent_axes(shape, dim, standardize_dim):
    pred = torch.randn(shape, dtype=torch.float64)
    target = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    torch.testing.assert_close(reference.cosine_loss(pred, target, dim=dim, standardize_dim=standardize_dim),
                               sdae_official_loss(pred, target, dim, standardize_dim))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape", [(6, 7, 5), (2 * 3, 49, 16), (4, 2, 3)])
def test_sdae_official_mode_forward_and_gradient_fold_by_fold(backend, shape):
    # dim=1 (tokens), standardize_dim=-1 (features): the official loss, to float64 rounding on the
    # torch backend; the Triton kernel (fp32 inside) to fp32 rounding of the same inputs.
    pred = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    target = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    expected = sdae_official_loss_fold_by_fold(pred, target)
    (grad_expected,) = torch.autograd.grad(expected, pred)
    if backend == "torch":  # the torch backend is the reference itself; the op's dtypes stop at fp32
        loss = reference.cosine_loss(pred, target, dim=1, standardize_dim=-1)
        (grad,) = torch.autograd.grad(loss, pred)
        torch.testing.assert_close(loss, expected, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(grad, grad_expected, rtol=1e-12, atol=1e-15)
        return
    device = triton_device()
    p32 = pred.detach().float().to(device).requires_grad_()
    t32 = target.float().to(device)
    loss = cosine_loss(p32, t32, dim=1, standardize_dim=-1, backend="triton")
    loss.backward()
    p64 = p32.detach().double().cpu().requires_grad_()
    expected = sdae_official_loss_fold_by_fold(p64, t32.double().cpu())
    expected.backward()
    n, vectors = shape[1], shape[0] * shape[2]
    assert_close(loss, expected, dtype=torch.float32, reduction=n * vectors, name="loss")
    assert_close(p32.grad, p64.grad, dtype=torch.float32, reduction=shape[2], name="grad pred")


# ------------------------------------------------------------------------------------------
# Triton against the reference
# ------------------------------------------------------------------------------------------
def _compare(shape, dim, dtype, standardize_target, *, scale=1.0, offset=0.0, standardize_dim=None):
    device = triton_device()
    pred = torch.randn(shape, device=device).to(dtype).requires_grad_()
    target = (torch.randn(shape, device=device) * scale + offset).to(dtype)
    sdim = dim if standardize_dim is None else standardize_dim
    loss = cosine_loss(pred, target, dim=dim, standardize_target=standardize_target, standardize_dim=sdim,
                       backend="triton")
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    expected = reference.cosine_loss(pred64, target.double(), dim=dim, standardize_target=standardize_target,
                                     standardize_dim=sdim)
    expected.backward()
    n = shape[dim]
    vectors = pred.numel() // n
    assert loss.dtype == torch.float32 and loss.dim() == 0
    # The inputs are the same dtype-rounded values on both sides, so only the fp32 arithmetic
    # differs: each cosine accumulates n products, the mean V cosines.
    assert_close(loss, expected, dtype=torch.float32, reduction=n * vectors, name="loss")
    # Each gradient element is rounded to pred's dtype after sums of n terms (mean, variance,
    # dot product, norms) and of the standardised axis' size for its statistics.
    assert pred.grad.dtype == dtype
    assert_close(pred.grad, pred64.grad, dtype=dtype, reduction=max(n, shape[sdim]), name="grad pred")


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("shape,dim,standardize_dim", [((6, 7, 33), 1, 2), ((6, 7, 33), 0, 2), ((6, 7, 33), 2, 1),
                                                       ((5, 49, 64), 1, 2), ((3, 5, 2, 3), 2, 0), ((3, 5, 2, 3), 0, 3),
                                                       ((9, 4), 0, 1)])
def test_triton_independent_axes_match_reference(shape, dim, standardize_dim, dtype):
    _compare(shape, dim, dtype, True, scale=3.0, offset=1.0, standardize_dim=standardize_dim)


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("standardize_target", [True, False])
@pytest.mark.parametrize("shape,dim", [((6, 7, 33), -1), ((6, 7, 33), 1), ((6, 7, 33), 0),
                                       ((5, 49, 64), 1), ((5, 49, 64), 2), ((3, 5, 2, 3), 2), ((17,), 0)])
def test_triton_matches_reference(shape, dim, dtype, standardize_target):
    _compare(shape, dim, dtype, standardize_target, scale=3.0, offset=1.0)


@pytest.mark.parametrize("dtype", triton_dtypes())
def test_triton_one_element_vectors(dtype):
    # n = 1: the standardised target is 0 (divisor max(n - 1, 1)), so cos = 0 and grad = 0.
    device = triton_device()
    pred = torch.randn(4, 1, 3, device=device).to(dtype).requires_grad_()
    target = torch.randn(4, 1, 3, device=device).to(dtype)
    loss = cosine_loss(pred, target, dim=1, standardize_dim=1, backend="triton")
    loss.backward()
    assert loss.item() == 1.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))
    # Unstandardised, cos = sign(p·t) = ±1. The exact gradient is 0, but both terms of
    # t/(|p||t|) - cos·p/|p|² are of size 1/(V|p|): fp32 leaves a residue of a few ulps of that.
    pred.grad = None
    loss = cosine_loss(pred, target, dim=1, standardize_target=False, backend="triton")
    loss.backward()
    sign = torch.sign(pred.double() * target.double())
    assert loss.item() == pytest.approx(1 - sign.mean().item(), abs=1e-6)
    term = 1 / (12 * pred.detach().double().abs())
    assert (pred.grad.double().abs() <= 8 * torch.finfo(torch.float32).eps * term).all()


def test_triton_zero_and_tiny_pred_vectors_match_autograd_of_clamps():
    # |p| = 0 and |p| < 1e-8: the norm is clamped, only t / (1e-8 |t|) remains (clamp_min is flat).
    device = triton_device()
    pred = torch.randn(4, 8, device=device)
    pred[0] = 0
    pred[1] *= 1e-10
    pred.requires_grad_()
    target = torch.randn(4, 8, device=device)
    loss = cosine_loss(pred, target, backend="triton")
    loss.backward()
    pred64 = pred.detach().double().requires_grad_()
    expected = reference.cosine_loss(pred64, target.double())
    expected.backward()
    assert_close(loss, expected, dtype=torch.float32, reduction=32, name="loss")
    for row in range(4):  # per row: the clamped rows' gradients are 1e8 larger than the others
        assert_close(pred.grad[row], pred64.grad[row], dtype=torch.float32, reduction=8, name=f"grad row {row}")


def test_triton_fp16_large_values_stay_finite():
    device = triton_device()
    pred = (torch.randn(8, 256, device=device) * 1e4).clamp(-6e4, 6e4).half().requires_grad_()
    target = (torch.randn(8, 256, device=device) * 1e4).clamp(-6e4, 6e4).half()
    loss = cosine_loss(pred, target, backend="triton")
    loss.backward()
    expected = reference.cosine_loss(pred.detach().double(), target.double())
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert_close(loss, expected, dtype=torch.float32, reduction=8 * 256)


def test_triton_grad_scales_with_upstream_and_skips_target():
    device = triton_device()
    pred = torch.randn(6, 7, 33, device=device).permute(2, 1, 0).requires_grad_()  # non-contiguous (33, 7, 6)
    target = torch.randn(33, 7, 6, device=device, requires_grad=True)
    (3.0 * cosine_loss(pred, target, dim=1, backend="triton")).backward()
    pred64 = pred.detach().double().requires_grad_()
    (3.0 * reference.cosine_loss(pred64, target.detach().double(), dim=1)).backward()  # features standardised
    assert_close(pred.grad, pred64.grad, dtype=torch.float32, reduction=7)
    assert target.grad is None


def test_triton_fp16_small_gradients_survive_a_grad_scaler():
    # V = 4096 vectors of 8: the unit-upstream gradient (~1/(V·|p|) ≈ 1e-4..1e-5) is largely in
    # fp16's subnormals; GradScaler's 2^16 upstream must scale it before the fp16 rounding, as
    # autograd of the reference does, not after.
    device = triton_device()
    pred = torch.randn(4096, 8, device=device).half().requires_grad_()
    target = torch.randn(4096, 8, device=device).half()
    (65536.0 * cosine_loss(pred, target, backend="triton")).backward()
    pred64 = pred.detach().double().requires_grad_()
    (65536.0 * reference.cosine_loss(pred64, target.double())).backward()
    assert_close(pred.grad, pred64.grad, dtype=torch.float16, reduction=8)


def _fp16_compare(pred, target, upstream=1.0, **kw):
    """Triton against the float64 reference on the same fp16-rounded inputs: loss and pred's grad."""
    pred = pred.detach().requires_grad_()
    loss = cosine_loss(pred, target, **kw, backend="triton")
    (upstream * loss).backward()
    pred64 = pred.detach().double().requires_grad_()
    expected = reference.cosine_loss(pred64, target.double(), **kw)
    (upstream * expected).backward()
    n = pred.shape[kw.get("dim", -1)]
    assert_close(loss, expected, dtype=torch.float32, reduction=pred.numel(), name="loss")
    assert pred.grad.dtype == torch.float16
    assert_close(pred.grad, pred64.grad, dtype=torch.float16, reduction=n, name="grad pred")


@pytest.mark.parametrize("shape, dim, standardize_dim", [((64, 8), -1, -1), ((8, 64), 0, 0), ((4, 8, 16), 1, -1)])
def test_triton_fp16_tiny_pred_gradient_does_not_overflow(shape, dim, standardize_dim):
    # |p| ~ 3e-6: the unit-upstream gradient ~1/(V·|p|) is finite in fp16 (hundreds to thousands),
    # but V times it (the gradient without the mean's 1/V) is not: it must not be stored that way.
    device = triton_device()
    pred = (torch.randn(shape, device=device) * 1e-6).half()
    target = torch.randn(shape, device=device).half()
    _fp16_compare(pred, target, dim=dim, standardize_dim=standardize_dim)


def test_triton_fp16_large_count_mixed_magnitudes_under_a_grad_scaler():
    # V = 2048 vectors with |p| spanning ~30..3000: the unit gradients (~1/(V·|p|), 6e-6..6e-8)
    # are deep in fp16's subnormals or below them, so the mean's 1/V folded into an fp16 store
    # would lose them before GradScaler's 2^16 upstream; the reference scales in fp32 and rounds
    # once. The magnitudes differ per vector: one scale for the whole tensor would not do.
    device = triton_device()
    magnitude = 10.0 ** (torch.rand(2048, 1, device=device) * 2 + 1)
    pred = (torch.randn(2048, 8, device=device) * magnitude).half()
    target = torch.randn(2048, 8, device=device).half()
    _fp16_compare(pred, target, upstream=65536.0)


def test_triton_mixed_dtypes_and_negative_dim():
    # Under autocast the student output is fp16 while the teacher target may stay fp32.
    device = triton_device()
    pred = torch.randn(6, 7, 33, device=device).half().requires_grad_()
    target = torch.randn(6, 7, 33, device=device)
    cosine_loss(pred, target, dim=-2, backend="triton").backward()
    pred64 = pred.detach().double().requires_grad_()
    reference.cosine_loss(pred64, target.double(), dim=1).backward()
    assert pred.grad.dtype == torch.float16
    assert_close(pred.grad, pred64.grad, dtype=torch.float16, reduction=7)


def test_triton_without_grad():
    device = triton_device()
    pred, target = torch.randn(5, 9, device=device), torch.randn(5, 9, device=device)
    loss = cosine_loss(pred, target.requires_grad_(), backend="triton")
    assert loss.grad_fn is None and not loss.requires_grad  # target is a constant
    assert_close(loss, reference.cosine_loss(pred.double(), target.double()), dtype=torch.float32, reduction=45)


def test_kernel_compiles_for_hopper():
    signature = {"pred_ptr": "*bf16", "target_ptr": "*bf16", "grad_ptr": "*bf16", "scale_ptr": "*fp32",
                 "partial_ptr": "*fp32",
                 "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                 "n": "i32", "inner": "i32", "num_inner_blocks": "i32", "num_vectors": "i32",
                 "inv_n": "fp32", "inv_n_minus_1": "fp32", "std_eps": "fp32", "cos_eps": "fp32", "grad_scale": "fp32",
                 "std_block": "i32", "std_inner": "i32",
                 "STANDARDIZE": "constexpr", "WRITE_GRAD": "constexpr", "VECTOR_SCALE": "constexpr",
                 "INNER_ONE": "constexpr",
                 "BLOCK_N": "constexpr", "BLOCK_V": "constexpr"}
    variants = [{"STANDARDIZE": 1, "WRITE_GRAD": True, "VECTOR_SCALE": False, "INNER_ONE": True, "BLOCK_N": 1024,
                 "BLOCK_V": 4},
                {"STANDARDIZE": 1, "WRITE_GRAD": True, "VECTOR_SCALE": True, "INNER_ONE": True, "BLOCK_N": 1024,
                 "BLOCK_V": 4},
                {"STANDARDIZE": 1, "WRITE_GRAD": True, "VECTOR_SCALE": False, "INNER_ONE": False, "BLOCK_N": 64,
                 "BLOCK_V": 64},
                {"STANDARDIZE": 2, "WRITE_GRAD": True, "VECTOR_SCALE": True, "INNER_ONE": False, "BLOCK_N": 64,
                 "BLOCK_V": 64}]
    compile_for_hopper("sdae_fast.kernels.cosine_loss", "_cosine_loss_fwd_kernel", signature, variants, num_warps=8)
    stats_signature = {"x_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "n": "i32", "inner": "i32",
                       "num_inner_blocks": "i32", "num_vectors": "i32", "inv_n": "fp32", "inv_n_minus_1": "fp32",
                       "eps": "fp32", "INNER_ONE": "constexpr", "BLOCK_N": "constexpr", "BLOCK_V": "constexpr"}
    compile_for_hopper("sdae_fast.kernels.cosine_loss", "_vector_stats_kernel", stats_signature,
                       [{"INNER_ONE": True, "BLOCK_N": 1024, "BLOCK_V": 4}], num_warps=8)


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------
def test_validation_errors():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="share one shape"):
        cosine_loss(x, torch.randn(3, 2))
    with pytest.raises(TypeError, match="dtype"):
        cosine_loss(x.long(), x.long())
    with pytest.raises(ValueError, match="out of range"):
        cosine_loss(x, x, dim=2)
    with pytest.raises(ValueError, match="out of range"):
        cosine_loss(x, x, dim=-3)
    with pytest.raises(ValueError, match="empty"):
        cosine_loss(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="standardize_dim=2"):
        cosine_loss(x, x, standardize_dim=2)
    with pytest.raises(ValueError, match="eps"):
        cosine_loss(x, x, eps=-1.0)
    with pytest.raises(ValueError, match="std_eps"):
        cosine_loss(x, x, std_eps=-1.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        cosine_loss([1.0, 2.0], x)


def test_triton_refuses_vectors_longer_than_a_tile():
    x = torch.randn(1, TRITON_MAX_VECTOR + 1)
    with pytest.raises(sdae_fast.BackendUnavailable, match="registers"):
        cosine_loss(x, x, backend="triton")


# ------------------------------------------------------------------------------------------
# GPU: bf16 and SdAE's real shapes
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [-1, 1])
def test_gpu_sdae_shapes(dtype, dim):
    _compare((3 * 16, 49, 768), dim, dtype, True, standardize_dim=-1)


@pytest.mark.gpu
def test_gpu_long_vectors():
    _compare((4, 16384), -1, torch.bfloat16, True)
    _compare((3, 4096, 5), 1, torch.bfloat16, False)
