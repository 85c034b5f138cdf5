"""dino_loss (SPEC §4): the reference against DINO's official loss, the fused Triton kernel against the
reference (loss, student gradient, centre update), and input validation."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import sdae_fast
from sdae_fast.reference import dino_loss as reference_dino_loss
from sdae_fast.testing import assert_close, triton_device, triton_dtypes


def official_dino_loss(student_output, teacher_output, center, *, student_temp, teacher_temp, ncrops,
                       center_momentum):
    """DINOLoss.forward + update_center of facebookresearch/dino (main_dino.py), re-derived.

    Returns (loss, new_center); assumes 2 global crops, as the official code does.
    """
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / teacher_temp, dim=-1).detach().chunk(2)
    total_loss, n_loss_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
            total_loss += loss.mean()
            n_loss_terms += 1
    total_loss /= n_loss_terms
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    new_center = center * center_momentum + batch_center * (1 - center_momentum)
    return total_loss, new_center


def _inputs(views, glob, batch, width, dtype, device, scale=1.0, center_shape=None):
    student = (torch.randn(views * batch, width, dtype=torch.float64) * scale).to(dtype).to(device)
    teacher = (torch.randn(glob * batch, width, dtype=torch.float64) * scale).to(dtype).to(device)
    center = (torch.randn(width, dtype=torch.float64) * 0.5).float().to(device)
    if center_shape is not None:
        center = center.reshape(center_shape)
    return student, teacher, center


def _reductions(student, teacher, center, student_temp, teacher_temp, pairs, batch):
    """fp32 terms summed, and the conditioning of exp(): the kernel rounds the scaled logit
    x = s/Ts (and (t - c)/Tt) in fp32, an absolute error ~eps·|x| that exp turns into a relative
    error of the softmax, so the bound grows with max|x| like sqrt(reduction) does in ``tolerance``."""
    x_max = max(student.double().abs().max().item() / student_temp,
                (teacher.double() - center.double().reshape(1, -1)).abs().max().item() / teacher_temp)
    width = student.shape[1]
    cond = math.ceil(x_max) ** 2
    return max(width * pairs * batch, cond), max(width, cond)


# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------
def test_reference_hand_computed():
    # Uniform student (all zeros): -Σ q log(1/K) = log K for any teacher.
    s = torch.zeros(4, 4, dtype=torch.float64)
    t = torch.randn(4, 4, dtype=torch.float64)
    c = torch.zeros(4, dtype=torch.float64)
    loss = reference_dino_loss(s, t, c, update_center=False)
    assert abs(loss.item() - math.log(4)) < 1e-12
    # A one-hot teacher (t = [30, 0] at Tt = 1 ⇒ q ≈ [1, 0]) picks -log_softmax(s)[0] = log(1 + e^(b-a)).
    a, b = 0.3, 1.2
    s = torch.tensor([[a, b], [a, b]], dtype=torch.float64)
    t = torch.tensor([[60.0, 0.0], [60.0, 0.0]], dtype=torch.float64)
    c = torch.zeros(1, 2, dtype=torch.float64)
    loss = reference_dino_loss(s, t, c, student_temp=1.0, teacher_temp=1.0, num_global=2, center_momentum=0.5)
    assert abs(loss.item() - math.log1p(math.exp(b - a))) < 1e-12
    # The centre moves halfway to the teacher's row mean [60, 0].
    assert torch.allclose(c, torch.tensor([[30.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize("views", [2, 4, 10])
def test_reference_matches_official_dino(views):
    batch, width = 3, 37
    s, t, c = (x.double() for x in _inputs(views, 2, batch, width, torch.float64, "cpu"))
    s = s.requires_grad_()
    c = c.reshape(1, width)
    want, want_center = official_dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.04, ncrops=views,
                                           center_momentum=0.9)
    ours_center = c.clone()
    got = reference_dino_loss(s, t, ours_center, student_temp=0.1, teacher_temp=0.04, num_global=2,
                              center_momentum=0.9)
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())
    assert torch.allclose(ours_center, want_center, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# The fused Triton kernel against the reference (fp64 oracle on the same rounded inputs)
# ---------------------------------------------------------------------------------------------
def _check_triton(views, glob, batch, width, dtype, *, scale=1.0, update_center=False, center_shape=None,
                  student_temp=0.1, teacher_temp=0.04, **launch):
    from sdae_fast.kernels.dino_loss import dino_loss as fused

    device = triton_device()
    s, t, c = _inputs(views, glob, batch, width, dtype, device, scale, center_shape)
    s_ours = s.clone().requires_grad_()
    s_ref = s.double().requires_grad_()
    c_ours, c_ref = c.clone(), c.double()
    kwargs = dict(student_temp=student_temp, teacher_temp=teacher_temp, num_global=glob,
                  update_center=update_center, center_momentum=0.9)
    if launch:
        loss = fused(s_ours, t, c_ours, **kwargs, **launch)
    else:
        loss = sdae_fast.dino_loss(s_ours, t, c_ours, backend="triton", **kwargs)
    want = reference_dino_loss(s_ref, t.double(), c_ref, **kwargs)
    loss.backward()
    want.backward()
    pairs = glob * views - min(glob, views)
    loss_red, grad_red = _reductions(s, t, c, student_temp, teacher_temp, pairs, batch)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.isfinite(loss) and torch.isfinite(s_ours.grad).all()
    assert_close(loss, want, dtype=torch.float32, reduction=loss_red, name="loss")
    assert_close(s_ours.grad, s_ref.grad, dtype=dtype, reduction=grad_red, name="student grad")
    # The centre: each element averages glob·batch teacher rows; the loss above used the old one.
    assert c_ours.shape == c.shape
    assert_close(c_ours, c_ref, dtype=torch.float32, reduction=glob * batch, name="center")
    if not update_center:
        assert torch.equal(c_ours, c)


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("views,batch,width", [(2, 3, 257), (10, 2, 1000), (3, 2, 100)])
def test_triton_matches_reference(views, batch, width, dtype):
    _check_triton(views, 2, batch, width, dtype)


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_split_combine(splits):
    # Block 128 over K = 1000: 8 tiles spread over 1 or 3 chunks (the last chunk is short).
    _check_triton(10, 2, 2, 1000, torch.float32, block_k=128, splits=splits)


@pytest.mark.parametrize("center_shape", [None, (1, 257)])
def test_triton_update_center(center_shape):
    _check_triton(4, 2, 3, 257, torch.float32, update_center=True, center_shape=center_shape)


@pytest.mark.parametrize("views,glob", [(2, 3), (1, 2)])
def test_triton_few_student_views(views, glob):
    # G = 3, V = 2: pairs (0,1), (1,0), (2,0), (2,1); G = 2, V = 1: the single pair (1,0).
    _check_triton(views, glob, 2, 129, torch.float32, student_temp=0.2, teacher_temp=0.07)


@pytest.mark.parametrize("dtype", triton_dtypes())
def test_triton_large_logits_stable(dtype):
    # |s/Ts| up to ~1e3, |(t - c)/Tt| up to ~4e3: the online max keeps exp() finite.
    _check_triton(3, 2, 2, 257, dtype, scale=30.0)


def test_triton_grad_output_scaling_and_strided_rows():
    device = triton_device()
    s, t, c = _inputs(3, 2, 2, 200, torch.float32, device)
    wide = torch.zeros(s.shape[0], 230, device=device)
    wide[:, :200] = s
    s_view = wide[:, :200].clone().requires_grad_()  # contiguous leaf for the grad...
    strided = torch.cat([s_view, wide[:, 200:]], dim=1)[:, :200]  # ...seen through a row stride of 230
    loss = sdae_fast.dino_loss(strided, t, c, backend="triton", update_center=False)
    (loss * 3.0).backward()
    s_ref = s.double().requires_grad_()
    (reference_dino_loss(s_ref, t.double(), c.double(), update_center=False) * 3.0).backward()
    _, grad_red = _reductions(s, t, c, 0.1, 0.04, 4, 2)
    assert_close(s_view.grad, s_ref.grad, dtype=torch.float32, reduction=grad_red, name="scaled grad")


def test_triton_fp16_gradient_survives_a_gradscaler_scale():
    """fp16, a real batch: the unit gradient (~1/(T·B·pairs·K)) is an fp16 subnormal. Stored times a
    power of two and unscaled in fp32, the gradient of 2^16 · loss equals the reference's (which
    computes in fp32 and rounds once) to fp16's own rounding; stored as is it lost most of its bits."""
    device = triton_device()
    s, t, c = _inputs(4, 2, 32, 1024, torch.float16, device)
    s = s.detach().requires_grad_()
    (sdae_fast.dino_loss(s, t, c, backend="triton", update_center=False) * 65536.0).backward()
    s_ref = s.detach().clone().requires_grad_()
    (reference_dino_loss(s_ref, t, c, update_center=False) * 65536.0).backward()  # fp32 math, one rounding
    unit = s_ref.grad.float().abs().median() / 65536.0
    assert unit < 6.1e-5  # the unit gradient of a typical element is below fp16's normal range
    _, grad_red = _reductions(s, t, c, 0.1, 0.04, 4, 2)
    assert_close(s.grad, s_ref.grad, dtype=torch.float16, reduction=grad_red, name="2^16-scaled fp16 grad")


def test_triton_without_student_grad():
    device = triton_device()
    s, t, c = _inputs(3, 2, 2, 130, torch.float32, device)
    loss = sdae_fast.dino_loss(s, t, c, backend="triton", update_center=False)
    want = reference_dino_loss(s.double(), t.double(), c.double(), update_center=False)
    assert not loss.requires_grad
    with torch.no_grad():  # evaluation: the gradient sweep is skipped, the loss is the same
        s_leaf = s.clone().requires_grad_()
        assert torch.equal(sdae_fast.dino_loss(s_leaf, t, c, backend="triton", update_center=False), loss)
    assert_close(loss, want, dtype=torch.float32, reduction=_reductions(s, t, c, 0.1, 0.04, 4, 2)[0])


@pytest.mark.gpu
def test_triton_dino_shape_bf16_gpu():
    # DINO's real shape: B = 64, 2 global + 8 local views, K = 65536; bf16 logits.
    _check_triton(10, 2, 64, 65536, torch.bfloat16, update_center=True)


@pytest.mark.gpu
def test_triton_dino_memory_gpu():
    # Beyond the inputs: the student gradient the forward writes (1× the student), and during the
    # backward the scaled copy that becomes s.grad (1× more: the saved one is an output of the
    # kernel op, never scaled in place); a few per-(element, split) statistics; never a softmax
    # of width K (V × G of them would be 12× the student).
    s, t, c = _inputs(10, 2, 64, 65536, torch.bfloat16, "cuda")
    s.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    sdae_fast.dino_loss(s, t, c, backend="triton").backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra <= 2.25 * s.numel() * s.element_size() + (8 << 20), f"{extra / 2**20:.1f} MiB extra"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_dino_shape_gpu(dtype):
    _check_triton(10, 2, 64, 65536, dtype)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_validation_errors(backend):
    s, t, c = _inputs(3, 2, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="output width K"):
        sdae_fast.dino_loss(s[:, :15], t, c, backend=backend)
    with pytest.raises(ValueError, match="output width K"):
        sdae_fast.dino_loss(s, t, c[:15], backend=backend)
    with pytest.raises(ValueError, match="student_temp must be a finite float >= 0.0001"):
        sdae_fast.dino_loss(s, t, c, student_temp=0.0, backend=backend)
    with pytest.raises(ValueError, match="teacher_temp must be a finite float >= 0.0001"):
        sdae_fast.dino_loss(s, t, c, teacher_temp=-1.0, backend=backend)
    with pytest.raises(ValueError, match="not a multiple of the batch"):
        sdae_fast.dino_loss(s[:5], t, c, backend=backend)
    with pytest.raises(ValueError, match="num_global"):
        sdae_fast.dino_loss(s, t[:3], c, backend=backend)
    with pytest.raises(ValueError, match="center_momentum"):
        sdae_fast.dino_loss(s, t, c, center_momentum=1.5, backend=backend)
    with pytest.raises(ValueError, match="2 dimensions"):
        sdae_fast.dino_loss(s[None], t, c, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        sdae_fast.dino_loss(s.long(), t, c, backend=backend)


def test_triton_refuses_too_many_views():
    s, t, c = _inputs(65, 2, 1, 16, torch.float32, "cpu")
    with pytest.raises(sdae_fast.BackendUnavailable, match="student views"):
        sdae_fast.dino_loss(s, t, c, backend="triton")


@pytest.mark.parametrize("scale", [3.0, 10.0])
def test_a_confident_student_close_to_its_teacher(scale):
    """Logits ~scale/Ts = 100 and a student a hair from its teacher (the end of a run, or a collapse):
    the loss is ~0.04 while lse and Σ q·s/Ts are ~100 each. Formed as their difference, its fp32
    error was eps·100 = 1e-5 absolute (5e-4 relative); per element, (m - x) + log l as log_softmax
    is, it is only the scaled logits' own rounding (eps·|x|, turned into a relative error of the
    softmax by exp: the conditioning term of _reductions), as for the reference in fp32."""
    g = torch.Generator().manual_seed(0)
    batch, views, width = 4, 4, 256
    base = torch.randn(batch, width, generator=g) * scale
    s = torch.cat([base + 0.01 * torch.randn(batch, width, generator=g) for _ in range(views)])
    t = torch.cat([base + 0.01 * torch.randn(batch, width, generator=g) for _ in range(2)])
    device = triton_device()
    ours = s.to(device).clone().requires_grad_()
    loss = sdae_fast.dino_loss(ours, t.to(device), torch.zeros(1, width, device=device), update_center=False,
                               backend="triton")
    loss.backward()
    ref = s.double().requires_grad_()
    want = reference_dino_loss(ref, t.double(), torch.zeros(1, width, dtype=torch.float64), update_center=False)
    want.backward()
    loss_terms, grad_terms = _reductions(s, t, torch.zeros(width), 0.1, 0.04, 2 * views - 2, batch)
    assert_close(loss, want, dtype=torch.float32, reduction=loss_terms, name="loss")
    assert_close(ours.grad, ref.grad, dtype=torch.float32, reduction=grad_terms, name="d student")


def test_kernels_compile_for_hopper():
    """Both sweeps compile for sm_90 (the interpreter misses compiler-only errors)."""
    from sdae_fast.testing import compile_for_hopper

    ptr16, ptr32 = "*bf16", "*fp32"
    sizes = {"B": "i32", "K": "i32", "CHUNK": "i32", "NSPLIT": "i32"}
    shapes = {"V": "constexpr", "G": "constexpr", "VP": "constexpr", "GP": "constexpr"}
    partials = {"ms_ptr": ptr32, "ls_ptr": ptr32, "mt_ptr": ptr32, "lt_ptr": ptr32}
    stats = {"s_ptr": ptr16, "t_ptr": ptr16, "c_ptr": ptr32, **partials, **sizes, "stride_s": "i32",
             "stride_t": "i32", "inv_ts": "fp32", "inv_tt": "fp32", **shapes, "BLOCK_K": "constexpr"}
    compile_for_hopper("sdae_fast.kernels.dino_loss", "_dino_stats_kernel", stats,
                       [{"V": 10, "G": 2, "VP": 16, "GP": 2, "BLOCK_K": 256}], num_warps=8)
    grad = {"s_ptr": ptr16, "t_ptr": ptr16, "c_ptr": ptr32, "g_ptr": ptr16, "loss_ptr": ptr32, **partials,
            **sizes, "stride_s": "i32", "stride_t": "i32", "stride_g": "i32", "inv_ts": "fp32", "inv_tt": "fp32",
            "grad_scale": "fp32", **shapes, "SP": "constexpr", "BLOCK_K": "constexpr", "WRITE_GRAD": "constexpr"}
    compile_for_hopper("sdae_fast.kernels.dino_loss", "_dino_grad_kernel", grad,
                       [{"V": 10, "G": 2, "VP": 16, "GP": 2, "SP": 16, "BLOCK_K": 256, "WRITE_GRAD": True}],
                       num_warps=8)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", triton_dtypes()[:2], ids=str)
def test_a_tensor_teacher_temperature_is_its_float(backend, dtype):
    """A 0-dim tensor teacher_temp (a schedule under torch.compile) gives the float's loss, student
    gradient and centre: bit for bit through Triton, which forms (t - c)·fp32(1/T) from a float
    too; to fp32 rounding through the reference, which divides by T instead."""
    device = triton_device()
    s, t, c = _inputs(4, 2, 3, 37, dtype, device)
    results = []
    for temp in (0.04, torch.tensor(0.04, dtype=torch.float64, device=device)):
        student, center = s.clone().requires_grad_(), c.clone()
        loss = sdae_fast.dino_loss(student, t, center, student_temp=0.1, teacher_temp=temp, num_global=2,
                                   center_momentum=0.9, backend=backend)
        loss.backward()
        results.append((loss.detach(), student.grad, center))
    (loss_f, grad_f, center_f), (loss_t, grad_t, center_t) = results
    assert torch.equal(center_f, center_t)
    if backend == "triton":
        assert torch.equal(loss_f, loss_t) and torch.equal(grad_f, grad_t)
    else:
        torch.testing.assert_close(loss_t, loss_f, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_t, grad_f, rtol=1e-4, atol=1e-7)
    sdae_fast.check_errors()


@pytest.mark.parametrize("value", [0.0, float("nan"), 1e-6])
def test_a_tensor_teacher_temperature_out_of_range_is_reported(value):
    s, t, c = _inputs(2, 2, 3, 5, torch.float32, "cpu")
    sdae_fast.dino_loss(s, t, c, teacher_temp=torch.tensor(value))  # deferred: no sync at the call
    named = re.escape(repr(float(torch.tensor(value))))  # the value as the fp32 tensor holds it
    with pytest.raises(ValueError, match=rf"dino_loss: the teacher_temp tensor must be >= 0.0001, got {named}$"):
        sdae_fast.check_errors()
    with pytest.raises(TypeError, match="teacher_temp must be a float or a 0-dim floating tensor"):
        sdae_fast.dino_loss(s, t, c, teacher_temp=torch.tensor([0.04]))
