"""homologous_contrastive_loss (SPEC §4): the reference against a hand computation and an explicit
per-anchor loop, the flash-style Triton kernel against the reference (loss and dz), validation."""
import math

import pytest
import torch
import torch.nn.functional as F

import sdae_fast
from sdae_fast.reference import homologous_contrastive_loss as reference_loss
from sdae_fast.testing import assert_close, triton_device, triton_dtypes


def per_anchor_loop(z, labels, temperature, normalize):
    """SPEC §4 written anchor by anchor: -mean_{j∈P(i)} log(exp(sim_ij) / Σ_{a≠i} exp(sim_ia))."""
    if normalize:
        z = F.normalize(z, dim=-1)
    losses = []
    for m in range(z.shape[0]):
        for i in range(z.shape[1]):
            others = [a for a in range(z.shape[1]) if a != i]
            positives = [j for j in others if labels[m, j] == labels[m, i]]
            if not positives:
                continue
            sims = {a: (z[m, i] @ z[m, a]) / temperature for a in others}
            log_den = torch.logsumexp(torch.stack([sims[a] for a in others]), dim=0)
            losses.append(-torch.stack([sims[j] - log_den for j in positives]).mean())
    return torch.stack(losses).mean() if losses else z.sum() * 0.0


def test_reference_hand_computed():
    # Tokens 0 and 1 identical, token 2 orthogonal (its label has no other member: skipped).
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]], dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1]])
    loss = reference_loss(z, labels, temperature=1.0, normalize=False)
    # Anchor 0: sims to (1, 2) are (1, 0) ⇒ -log(e / (e + 1)) = log(1 + e^-1); anchor 1 the same.
    assert abs(loss.item() - math.log1p(math.exp(-1.0))) < 1e-12


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_matches_per_anchor_loop(normalize):
    z = torch.randn(2, 9, 5, dtype=torch.float64)
    labels = torch.tensor([[0, 0, 1, 1, 1, 2, 3, 3, 0], [4, 4, 4, 4, 5, 6, 7, 7, 7]])
    got = reference_loss(z, labels, temperature=0.2, normalize=normalize)
    want = per_anchor_loop(z, labels, 0.2, normalize)
    assert abs(got.item() - want.item()) <= 1e-12 * abs(want.item())


def _check_triton(m, n, d, labels, dtype, *, normalize, temperature=0.1, scale=1.0):
    device = triton_device()
    z = (torch.randn(m, n, d, dtype=torch.float64) * scale).to(dtype).to(device)
    labels = labels.to(device)
    z_ours = z.clone().requires_grad_()
    z_ref = z.double().requires_grad_()
    loss = sdae_fast.homologous_contrastive_loss(z_ours, labels, temperature=temperature, normalize=normalize,
                                                 backend="triton")
    want = reference_loss(z_ref, labels, temperature=temperature, normalize=normalize)
    loss.backward()
    want.backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert torch.isfinite(z_ours.grad).all()
    # Each similarity sums d products; each anchor's loss and each dz element sum over n keys of
    # them. The loss is an fp32 scalar of the very z the reference reads (the kernel scales by fp32
    # inverse norms and never rounds a normalised z), so its bound is fp32's whatever z's dtype.
    assert_close(loss, want, dtype=torch.float32, reduction=n * d, name="loss")
    assert_close(z_ours.grad, z_ref.grad, dtype=dtype, reduction=n * d, name="dz")
    return loss, z_ours.grad


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m,n,d,sources", [(2, 7, 32, 2), (2, 50, 33, 3), (1, 50, 32, 4)])
def test_triton_matches_reference(m, n, d, sources, normalize, dtype):
    labels = torch.randint(0, sources, (m, n))
    # Unnormalised features: keep the similarities O(1) as normalised ones are.
    _check_triton(m, n, d, labels, dtype, normalize=normalize, scale=1.0 if normalize else d ** -0.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on the GPU every test already uses this geometry")
@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("normalize", [True, False])
def test_gpu_geometry_in_interpreter(monkeypatch, dtype, normalize):
    """The GPU's tiles (gpu_blocks: 64 x 64, fp32 16-wide D steps) in the interpreter: two anchor and
    key blocks, D = 72 in partial D steps and, for fp32, two backward output chunks."""
    from sdae_fast.kernels import contrastive_loss as kernel

    used = []
    monkeypatch.setattr(kernel, "_blocks", lambda n, d, z: used.append(z.dtype) or kernel.gpu_blocks(z.dtype))
    labels = torch.randint(0, 5, (2, 70), generator=torch.Generator().manual_seed(0))
    _check_triton(2, 70, 72, labels, dtype, normalize=normalize, scale=1.0 if normalize else 72 ** -0.5)
    assert len(used) == 2  # forward and backward launched with the GPU's tiles


def test_triton_anchors_without_positives():
    # Labels 5 and 9 appear once in image 0; image 1 has a single loner (label 3).
    labels = torch.tensor([[0, 0, 5, 1, 1, 1, 9] + [0] * 10, [3] + [1] * 8 + [2] * 8])
    _check_triton(2, 17, 33, labels, torch.float32, normalize=True)


@pytest.mark.parametrize("normalize", [True, False])
def test_triton_all_unique_labels_give_zero(normalize):
    labels = torch.arange(20).repeat(2, 1)
    loss, grad = _check_triton(2, 20, 32, labels, torch.float32, normalize=normalize)
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("dtype", triton_dtypes())
def test_tiny_norm_and_zero_tokens_stay_on_their_own_rows(dtype):
    """A token of norm ~1e-5 (1/||z|| overflows 16 bits) and an all-zero token: the loss and every
    other row's gradient stay finite and match the reference; only those rows may overflow dz's
    dtype, exactly where the float64 reference's gradient passes the dtype's range."""
    device = triton_device()
    m, n, d = 2, 12, 16
    z = torch.randn(m, n, d)
    z[0, 3] *= 1e-5 / z[0, 3].norm()  # tiny norm
    z[1, 5] = 0.0  # zero token: F.normalize clamps its norm to 1e-12
    z = z.to(dtype)
    labels = torch.randint(0, 3, (m, n))
    z_ours = z.to(device).clone().requires_grad_()
    z_ref = z.double().requires_grad_()
    loss = sdae_fast.homologous_contrastive_loss(z_ours, labels.to(device), backend="triton")
    want = reference_loss(z_ref, labels)
    loss.backward()
    want.backward()
    assert torch.isfinite(loss)
    assert_close(loss, want, dtype=torch.float32, reduction=n * d, name="loss")
    top = torch.finfo(dtype).max
    expected = torch.where(z_ref.grad.abs() > top, z_ref.grad.sign() * math.inf, z_ref.grad)
    others = torch.ones(m, n, dtype=torch.bool)
    others[0, 3] = others[1, 5] = False
    assert torch.isfinite(z_ours.grad[others]).all()
    # Apart: the tiny token's gradient (~1e11) would otherwise set assert_close's max|e| floor for
    # every row, and an ordinary row zeroed or tripled would still pass.
    assert_close(z_ours.grad[others], expected[others], dtype=dtype, reduction=n * d, name="dz, ordinary rows")
    assert_close(z_ours.grad[~others], expected[~others], dtype=dtype, reduction=n * d, name="dz, tiny and zero rows")


def test_fp16_small_tokens_and_a_small_upstream_gradient():
    """fp16 z of norm ~0.008 and an upstream 1e-5: dL/dz is a normal fp16 number, but the kernel
    runs on p·z (p = 2^k from 1/||z||, see _fp16_safe_scaling) and its gradient dL/d(p·z) is p
    times smaller; stored in fp16 before the multiply by p, it fell to subnormals (6 % off). The
    factor p now applies in fp32, before the one rounding to fp16."""
    device = triton_device()
    labels = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 2, device=device)
    z = (torch.randn(2, 8, 64, dtype=torch.float64) * 1e-3).half().to(device)
    z_ours, z_ref = z.clone().requires_grad_(), z.double().requires_grad_()
    (sdae_fast.homologous_contrastive_loss(z_ours, labels, backend="triton") * 1e-5).backward()
    (reference_loss(z_ref, labels.cpu()) * 1e-5).backward()
    assert_close(z_ours.grad, z_ref.grad, dtype=torch.float16, reduction=8 * 64, name="dz")


def test_triton_grad_output_scaling_and_temperature():
    device = triton_device()
    z = torch.randn(2, 19, 32, device=device)
    labels = torch.randint(0, 3, (2, 19), device=device)
    z_ours, z_ref = z.clone().requires_grad_(), z.double().requires_grad_()
    (sdae_fast.homologous_contrastive_loss(z_ours, labels, temperature=0.5, backend="triton") * -2.5).backward()
    (reference_loss(z_ref, labels, temperature=0.5) * -2.5).backward()
    assert_close(z_ours.grad, z_ref.grad, dtype=torch.float32, reduction=19 * 32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_mixedae_shape_gpu(dtype):
    # MixedAE ViT-B: 196 tokens of width 768, 4 sources per mixed image.
    _check_triton(8, 196, 768, torch.randint(0, 4, (8, 196)), dtype, normalize=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_validation_errors(backend, checks_mode):
    z = torch.randn(2, 5, 8)
    labels = torch.randint(0, 2, (2, 5))
    with pytest.raises(IndexError, match="homologous_contrastive_loss: labels must be non-negative source ids, found -"):
        sdae_fast.homologous_contrastive_loss(z, labels - 3, backend=backend)
        sdae_fast.check_errors()
    with pytest.raises(ValueError, match="labels must have shape"):
        sdae_fast.homologous_contrastive_loss(z, labels[:, :4], backend=backend)
    with pytest.raises(ValueError, match="temperature must be a finite float >= 0.0001"):
        sdae_fast.homologous_contrastive_loss(z, labels, temperature=0.0, backend=backend)
    with pytest.raises(ValueError, match="3 dimensions"):
        sdae_fast.homologous_contrastive_loss(z[0], labels, backend=backend)
    with pytest.raises(TypeError, match="labels must have dtype"):
        sdae_fast.homologous_contrastive_loss(z, labels.float(), backend=backend)


def test_triton_refuses_empty_input():
    with pytest.raises(sdae_fast.BackendUnavailable, match="empty"):
        sdae_fast.homologous_contrastive_loss(torch.randn(2, 0, 8), torch.zeros(2, 0, dtype=torch.long),
                                              backend="triton")
