"""Batch invariance (flash-linear-attention's tier): a sample's result from a fused kernel does not
depend on which other samples share its batch. Each op runs on a batch, then on every sample alone,
and the sample's rows must be **bit for bit** equal: forward outputs, and every gradient.

Why it can fail: a kernel whose tiling, split or reduction order follows the batch size (a split-K
over rows of several samples, a program that straddles two samples, an autotune key on B) rounds a
sample differently in different batches, so a model's output for one image changes with its
neighbours and runs stop being reproducible across batch sizes.

The losses average over the batch: a sample's gradient in a batch of B is 1/B of its gradient
alone. B is a power of two and every sample has as many averaged positions (masked patches,
anchors), so that scaling is exact, and the gradient of ``B · loss_batch`` equals the sample's
gradient alone bit for bit too.
The plain-PyTorch references are not held to this (a BLAS may pick another kernel per shape).
"""
import pytest
import torch

import sdae_fast
from sdae_fast.testing import triton_device, triton_dtypes

DEVICE = triton_device()
B = 4  # a power of two: the loss averages' 1/B is exact (see above)
FUSED_EMA = ["triton"] + (["cuda"] if torch.cuda.is_available() else [])


def leaf(t):
    return t.detach().clone().requires_grad_()


def assert_bitwise(batched, alone, what):
    assert batched.dtype == alone.dtype and batched.shape == alone.shape, what
    assert torch.equal(batched, alone), f"{what}: max diff {(batched.float() - alone.float()).abs().max().item()}"


def rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("n,topk", [(37, 9), (64, 64)])
def test_topk_attention(n, topk, dtype):
    q, k, v = (leaf(rand(3, 2, n, 32, dtype=dtype)) for _ in range(3))
    d_out = rand(3, 2, n, 32, dtype=dtype)
    out = sdae_fast.topk_attention(q, k, v, topk, backend="triton")
    out.backward(d_out)
    for b in range(3):
        qb, kb, vb = (leaf(t[b:b + 1]) for t in (q, k, v))
        out_b = sdae_fast.topk_attention(qb, kb, vb, topk, backend="triton")
        out_b.backward(d_out[b:b + 1])
        assert_bitwise(out[b:b + 1], out_b, f"out[{b}]")
        for name, full, one in (("dq", q, qb), ("dk", k, kb), ("dv", v, vb)):
            assert_bitwise(full.grad[b:b + 1], one.grad, f"{name}[{b}]")


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_gather_tokens_multi_fold(dtype):
    """SdAE's fold gather: rows r·F .. r·F + F - 1 of the output belong to sample r."""
    folds, length, dim = 3, 20, 24
    x = leaf(rand(B, length, dim, dtype=dtype))
    pos_embed, prefix = rand(length, dim, dtype=dtype), rand(1, dim, dtype=dtype)
    index = torch.stack([torch.randperm(length, device=DEVICE)[:7] for _ in range(B * folds)])
    d_out = rand(B * folds, 8, dim, dtype=dtype)
    kw = dict(pos_embed=pos_embed, prefix=prefix, groups=folds, backend="triton")
    out = sdae_fast.gather_tokens(x, index, **kw)
    out.backward(d_out)
    for b in range(B):
        rows = slice(b * folds, (b + 1) * folds)
        xb = leaf(x[b:b + 1])
        out_b = sdae_fast.gather_tokens(xb, index[rows], **kw)
        out_b.backward(d_out[rows])
        assert_bitwise(out[rows], out_b, f"out[{b}]")
        assert_bitwise(x.grad[b:b + 1], xb.grad, f"dx[{b}]")


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_unshuffle_tokens(dtype):
    length, keep, dim = 16, 5, 24
    ids_restore = torch.stack([torch.randperm(length, device=DEVICE) for _ in range(B)])
    x_vis = leaf(rand(B, 1 + keep, dim, dtype=dtype))
    mask_token, pos_embed = rand(dim, dtype=dtype), rand(1 + length, dim, dtype=dtype)
    d_out = rand(B, 1 + length, dim, dtype=dtype)
    kw = dict(pos_embed=pos_embed, num_prefix=1, backend="triton")
    out = sdae_fast.unshuffle_tokens(x_vis, ids_restore, mask_token, **kw)
    out.backward(d_out)
    for b in range(B):
        xb = leaf(x_vis[b:b + 1])
        out_b = sdae_fast.unshuffle_tokens(xb, ids_restore[b:b + 1], mask_token, **kw)
        out_b.backward(d_out[b:b + 1])
        assert_bitwise(out[b:b + 1], out_b, f"out[{b}]")
        assert_bitwise(x_vis.grad[b:b + 1], xb.grad, f"dx_vis[{b}]")


def pick(b):
    """The batch's rows of sample ``b`` (all of them for ``None``), for batch-major inputs."""
    return slice(None) if b is None else slice(b, b + 1)


def _scaled_grad_matches(loss_fn, pred, rows_of, extra_of):
    """The gradient of B times the batch's loss equals each sample's gradient alone (see the module
    docstring; the factor goes in as the upstream gradient, not onto the 16-bit result, where 1/B of
    a small gradient would be subnormal)."""
    (loss_fn(pred, *extra_of(None)) * B).backward()
    for b in range(B):
        alone = leaf(pred[rows_of(b)])
        loss_fn(alone, *extra_of(b)).backward()
        assert_bitwise(pred.grad[rows_of(b)], alone.grad, f"grad of sample {b}")


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_masked_mse_loss(dtype):
    length, patch = 16, 12
    pred, target = leaf(rand(B, length, patch, dtype=dtype)), rand(B, length, patch, dtype=dtype)
    mask = torch.stack([(torch.randperm(length, device=DEVICE) < 12).float() for _ in range(B)])
    _scaled_grad_matches(lambda p, t, m: sdae_fast.masked_mse_loss(p, t, m, backend="triton"), pred, pick,
                         lambda b: (target[pick(b)], mask[pick(b)]))


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
@pytest.mark.parametrize("dim", [-1, 1], ids=["paper", "official"])
def test_cosine_loss(dim, dtype):
    pred, target = leaf(rand(B, 10, 16, dtype=dtype)), rand(B, 10, 16, dtype=dtype)
    _scaled_grad_matches(lambda p, t: sdae_fast.cosine_loss(p, t, dim=dim, backend="triton"), pred, pick,
                         lambda b: (target[pick(b)],))


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_dino_loss(dtype):
    """Rows are view-major (view v of sample b is row v·B + b); the centre is not updated, since its
    update is a mean over the batch by definition. 1300 columns are three 512-wide tiles, so the
    kernel splits K across programs: a split count that followed the batch size would change the
    order in which a row's partial statistics combine."""
    views, num_global, width = 4, 2, 1300
    student, teacher = leaf(rand(views * B, width, dtype=dtype)), rand(num_global * B, width, dtype=dtype)
    center = torch.randn(1, width, device=DEVICE)

    def rows(b, count=views):
        return slice(None) if b is None else [v * B + b for v in range(count)]

    _scaled_grad_matches(
        lambda s, t: sdae_fast.dino_loss(s, t, center.clone(), update_center=False, backend="triton"),
        student, rows, lambda b: (teacher[rows(b, num_global)],))


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_homologous_contrastive_loss(dtype):
    """Every image has 12 anchors, each with positives: the loss's mean over anchors is B · 12."""
    z = leaf(rand(B, 12, 16, dtype=dtype))
    labels = torch.arange(3, device=DEVICE).repeat(4)[torch.randperm(12, device=DEVICE)].repeat(B, 1)
    _scaled_grad_matches(lambda x, lab: sdae_fast.homologous_contrastive_loss(x, lab, backend="triton"), z, pick,
                         lambda b: (labels[pick(b)],))


@pytest.mark.parametrize("backend", FUSED_EMA)
def test_ema_update_pairs_are_independent(backend):
    """The multi-tensor update of a group gives each tensor what updating it alone gives (sizes on
    both sides of a block, and a bf16 teacher of an fp32 student where the GPU has bf16)."""
    teacher_dtypes = triton_dtypes()
    sizes = (5, 1000, 77, 4099)
    teacher = [rand(n).to(teacher_dtypes[i % len(teacher_dtypes)]) for i, n in enumerate(sizes)]
    student = [rand(n) for n in sizes]
    alone = [t.clone() for t in teacher]
    sdae_fast.ema_update_(teacher, student, 0.9, backend=backend)
    for i, (t, s) in enumerate(zip(alone, student)):
        sdae_fast.ema_update_([t], [s], 0.9, backend=backend)
        assert_bitwise(teacher[i], t, f"tensor {i}")


# ----------------------------------------------------------------------------------------------
# GPU: the SPEC's shapes, where autotuning and multi-block reductions come into play
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_topk_attention_vit_b(dtype):
    """ViT-B/16 at 224 px (197 tokens, 12 heads of 64), MixedAE's K = N / 4, a batch of 16 against
    its samples 0 and 15 alone."""
    q, k, v = (leaf(rand(16, 12, 197, 64, dtype=dtype)) for _ in range(3))
    d_out = rand(16, 12, 197, 64, dtype=dtype)
    out = sdae_fast.topk_attention(q, k, v, 49, backend="triton")
    out.backward(d_out)
    for b in (0, 15):
        qb, kb, vb = (leaf(t[b:b + 1]) for t in (q, k, v))
        out_b = sdae_fast.topk_attention(qb, kb, vb, 49, backend="triton")
        out_b.backward(d_out[b:b + 1])
        assert_bitwise(out[b:b + 1], out_b, f"out[{b}]")
        for name, full, one in (("dq", q, qb), ("dk", k, kb), ("dv", v, vb)):
            assert_bitwise(full.grad[b:b + 1], one.grad, f"{name}[{b}]")


@pytest.mark.gpu
def test_gpu_dino_loss_full_width():
    """DINO's 65536-wide head, 2 global + 10 local views, bf16 logits, a batch of 16."""
    batch, views, width = 16, 12, 65536
    student, teacher = leaf(rand(views * batch, width, dtype=torch.bfloat16)), rand(2 * batch, width,
                                                                                     dtype=torch.bfloat16)
    center = torch.randn(1, width, device=DEVICE)
    (sdae_fast.dino_loss(student, teacher, center.clone(), update_center=False, backend="triton") * batch).backward()
    for b in (0, batch - 1):
        alone = leaf(student[b::batch])
        sdae_fast.dino_loss(alone, teacher[b::batch], center.clone(), update_center=False, backend="triton").backward()
        assert_bitwise(student.grad[b::batch], alone.grad, f"grad of sample {b}")
