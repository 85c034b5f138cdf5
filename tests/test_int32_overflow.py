"""Element offsets past 2^31 (flash-linear-attention style large-shape cases): every kernel either
addresses in int64 there or refuses with a reason. The GPU cases allocate several GB each."""
import pytest
import torch

import sdae_fast
from sdae_fast import reference
from sdae_fast.testing import assert_close

BIG = 2**31


def test_topk_attention_refuses_offsets_past_int32():
    """MixedAE's strided qkv views: B·N·3C >= 2^31 (B = 700, N = 1024, C = 1024). Meta tensors:
    only shapes and strides matter."""
    from sdae_fast.kernels.topk_attention import why_not

    b, n, heads, d = 700, 1024, 16, 64
    qkv = torch.empty(b, n, 3, heads, d, device="meta").permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    assert any("2^31" in reason for reason in why_not(q, k, v))
    small = torch.empty(2, heads, n, d, device="meta")
    assert not why_not(small, small, small)


@pytest.mark.gpu
def test_ema_tensor_past_int32():
    n = BIG + 4099
    t, s = torch.zeros(n, device="cuda"), torch.ones(n, device="cuda")
    sdae_fast.ema_update_([t], [s], 0.75, backend="triton")
    for part in (t[:8], t[BIG - 8:BIG + 8], t[-8:]):
        assert torch.equal(part, torch.full_like(part, 0.25))


@pytest.mark.gpu
def test_masked_mse_loss_past_int32():
    b, l, p = BIG // (196 * 768) + 1, 196, 768
    pred, target = (torch.randn(b, l, p, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    mask = (torch.rand(b, l, device="cuda") < 0.75).float()
    pred.requires_grad_()
    loss = sdae_fast.masked_mse_loss(pred, target, mask, backend="triton")
    loss.backward()
    ref_pred = pred.detach().clone().requires_grad_()
    want = reference.masked_mse_loss(ref_pred, target, mask)
    want.backward()
    assert_close(loss, want, dtype=torch.float32, reduction=b * l * p, name="loss")
    assert_close(pred.grad[-2:], ref_pred.grad[-2:], dtype=torch.bfloat16, reduction=p, name="grad tail")


@pytest.mark.gpu
def test_cosine_loss_past_int32():
    b, l, dim = BIG // (49 * 1024) + 1, 49, 1024
    pred, target = (torch.randn(b, l, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pred.requires_grad_()
    loss = sdae_fast.cosine_loss(pred, target, backend="triton")
    loss.backward()
    ref_pred = pred.detach().clone().requires_grad_()
    want = reference.cosine_loss(ref_pred, target)
    want.backward()
    assert_close(loss, want, dtype=torch.float32, reduction=b * l * dim, name="loss")
    assert_close(pred.grad[-2:], ref_pred.grad[-2:], dtype=torch.bfloat16, reduction=dim, name="grad tail")


@pytest.mark.gpu
def test_dino_loss_past_int32():
    views, width = 4, 65536
    batch = BIG // (views * width) + 1
    student = torch.randn(views * batch, width, device="cuda", dtype=torch.bfloat16).requires_grad_()
    teacher = torch.randn(2 * batch, width, device="cuda", dtype=torch.bfloat16)
    center = torch.zeros(width, device="cuda")
    loss = sdae_fast.dino_loss(student, teacher, center.clone(), update_center=False, backend="triton")
    loss.backward()
    ref_student = student.detach().clone().requires_grad_()
    want = reference.dino_loss(ref_student, teacher, center.clone(), update_center=False)
    want.backward()
    assert_close(loss, want, dtype=torch.float32, reduction=width, name="loss")
    assert_close(student.grad[-2:], ref_student.grad[-2:], dtype=torch.bfloat16, reduction=width, name="grad tail")


@pytest.mark.gpu
def test_contrastive_loss_past_int32():
    m, n, d = BIG // (196 * 768) + 1, 196, 768
    z = torch.randn(m, n, d, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 4, (m, n), device="cuda")
    loss = sdae_fast.homologous_contrastive_loss(z, labels, backend="triton")
    loss.backward()
    ref_z = z.detach().clone().requires_grad_()
    want = reference.homologous_contrastive_loss(ref_z, labels)
    want.backward()
    assert_close(loss, want, dtype=torch.bfloat16, reduction=n * d, name="loss")
    assert_close(z.grad[-2:], ref_z.grad[-2:], dtype=torch.bfloat16, reduction=n * d, name="grad tail")
