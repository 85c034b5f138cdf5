"""Triton gather_tokens / unshuffle_tokens against the reference (interpreter on CPU, or the GPU).

Forwards are pure copies plus one fp32 add rounded once, so they must equal the reference run on
the same inputs bit for bit. Gradients are fp32 sums rounded once to each input's dtype; they are
compared with the reference on float64 inputs, ``reduction`` = the most terms any element sums.
"""
import pytest
import torch

import sdae_fast

from sdae_fast import reference
from sdae_fast.dispatch import BackendUnavailable
from sdae_fast.ops.masking import gather_tokens, random_masking, unshuffle_tokens
from sdae_fast.testing import assert_close, triton_device, triton_dtypes

DEVICE = triton_device()
pytestmark = pytest.mark.interpreter  # every test here runs the Triton kernels (interpreter on the CPU)


def leaf(t, requires_grad=True):
    return t.detach().clone().requires_grad_(requires_grad)


def grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def transposed(t):
    """The same values laid out transposed in the last two dims (inner stride != 1), or, 1-D, strided."""
    if t.dim() == 1:
        return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def strided_leaf(t, requires_grad=True):
    """A leaf in ``t``'s layout (``leaf`` clones, which keeps only dense layouts)."""
    return t.detach().requires_grad_(requires_grad)


def max_multiplicity(index: torch.Tensor, groups: int) -> int:
    """Most times one (image, position) is read: the terms its dx element sums."""
    rows = index.shape[0]
    key = (torch.arange(rows, device=index.device)[:, None] // groups) * 100_000 + index.long()
    return int(torch.unique(key, return_counts=True)[1].max())


# ---------------------------------------------------------------- gather_tokens
def check_gather(B, L, D, M, groups, P, dtype, index_dtype, *, with_pos=True, param_dtype=None,
                 repeat=False, need=(True, True, True), layout=None):
    """``layout``: None (contiguous), "index" (a transposed index) or "all" (x, index, pos_embed and
    prefix all with a non-unit inner stride)."""
    param_dtype = param_dtype or dtype
    x = leaf(torch.randn(B, L, D, device=DEVICE).to(dtype), need[0])
    index = torch.randint(0, L, (B * groups, M), device=DEVICE)
    if repeat and M > 1:
        index[:, -1] = index[:, 0]  # the same position twice in one row
        index[-1] = index[0]
    index = index.to(index_dtype)
    pos = leaf(torch.randn(L, D, device=DEVICE).to(param_dtype), need[1]) if with_pos else None
    prefix = leaf(torch.randn(P, D, device=DEVICE).to(param_dtype), need[2]) if P else None
    if layout is not None:
        index = transposed(index)
        assert M < 2 or B * groups < 2 or index.stride(-1) != 1
    if layout == "all":
        x, pos, prefix = [None if t is None else strided_leaf(transposed(t), r)
                          for t, r in zip((x, pos, prefix), need)]

    out = gather_tokens(x, index, pos_embed=pos, prefix=prefix, groups=groups, backend="triton")
    expected = reference.gather_tokens(x, index, pos_embed=pos, prefix=prefix, groups=groups)
    assert out.dtype == dtype and out.shape == (B * groups, P + M, D)
    assert torch.equal(out, expected), "forward must equal the reference bit for bit"

    inputs = [x, pos, prefix]
    if not any(t is not None and t.requires_grad for t in inputs):
        return
    g = torch.randn_like(out)
    got = grads(out, inputs, g)
    hi = [None if t is None else leaf(t.double(), t.requires_grad) for t in inputs]
    want = grads(reference.gather_tokens(hi[0], index, pos_embed=hi[1], prefix=hi[2], groups=groups), hi, g.double())
    terms = {"dx": max_multiplicity(index, groups), "dpos": B * groups * M, "dprefix": B * groups}
    names = [n for n, t in zip(("dx", "dpos", "dprefix"), inputs) if t is not None and t.requires_grad]
    for name, a, e, t in zip(names, got, want, [t for t in inputs if t is not None and t.requires_grad]):
        assert a.dtype == t.dtype, f"{name} must come back in its input's dtype"
        assert_close(a, e, dtype=t.dtype, reduction=terms[name], name=name)


GATHER_SHAPES = [  # B, L, D, M, groups, P, index dtype
    (2, 10, 33, 4, 1, 1, torch.int64),  # odd D, MAE encoder style
    (3, 12, 100, 3, 2, 2, torch.int32),  # SdAE folds (groups), two prefix rows
    (1, 5, 16, 1, 1, 0, torch.int64),  # batch 1, M = 1, no prefix
]


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "B{}L{}D{}M{}g{}P{}".format(*s[:6]))
def test_gather_matches_reference(shape, dtype):
    check_gather(*shape[:6], dtype, shape[6])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_repeated_indices(index_dtype):
    # repeats inside a row, across groups and across rows: dx must sum every one
    check_gather(2, 9, 7, 6, 3, 1, torch.float32, index_dtype, repeat=True)


def test_gather_mixed_param_dtype_and_partial_grads():
    # fp32 parameters with fp16 activations: output fp16, grads in each input's own dtype
    check_gather(2, 8, 24, 3, 1, 1, torch.float16, torch.int64, param_dtype=torch.float32)
    check_gather(2, 8, 24, 3, 2, 1, torch.float32, torch.int32, need=(True, False, False))
    check_gather(2, 8, 24, 3, 1, 2, torch.float32, torch.int64, need=(False, True, True))
    check_gather(2, 8, 24, 3, 1, 1, torch.float32, torch.int64, with_pos=False, need=(False, False, False))


@pytest.mark.parametrize("dtype", triton_dtypes())
def test_gather_without_pos_embed(dtype):
    # The kernels' NEED_PARAM / pos-less paths: dx and dprefix with no pos_embed, repeats included.
    check_gather(2, 9, 33, 4, 3, 1, dtype, torch.int64, with_pos=False, repeat=True)
    check_gather(3, 7, 16, 5, 1, 0, dtype, torch.int32, with_pos=False)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["index", "all"])
def test_gather_strided_grads(layout, index_dtype):
    # the backward must read the index (and the inputs) in the layout the forward read: forward and
    # every gradient against the reference, with an index of strides (1, B·groups)
    check_gather(3, 7, 5, 4, 1, 1, torch.float32, index_dtype, layout=layout)
    check_gather(2, 9, 7, 5, 3, 2, torch.float32, index_dtype, repeat=True, layout=layout)  # repeats: the walk
    check_gather(3, 7, 5, 4, 1, 0, torch.float32, index_dtype, need=(True, True, False), layout=layout)


def test_gather_strided_inputs():
    B, L, D = 2, 6, 10
    base = torch.randn(B, L + 3, 2 * D, device=DEVICE)
    x = base[:, 2:L + 2, :D]  # non-trivial batch and row strides
    xt = torch.randn(B, D, L, device=DEVICE).transpose(1, 2)  # feature stride != 1
    index = torch.randint(0, L, (2 * B, 3), device=DEVICE)[::2]  # strided index rows
    pos = torch.randn(L, 2 * D, device=DEVICE)[:, :D]
    for inp in (x, xt):
        out = gather_tokens(inp, index, pos_embed=pos, backend="triton")
        assert torch.equal(out, reference.gather_tokens(inp, index, pos_embed=pos))


# ---------------------------------------------------------------- unshuffle_tokens
def check_unshuffle(B, L, K, D, P, dtype, index_dtype, *, permutation=True, param_dtype=None,
                    need=(True, True, True), layout=None, with_pos=True):
    """``layout``: None (contiguous), "index" (a transposed ids_restore) or "all" (x_vis, ids_restore,
    mask_token and pos_embed all with a non-unit inner stride)."""
    param_dtype = param_dtype or dtype
    if permutation:
        ids_restore = random_masking(B, L, 1 - K / L, device=DEVICE).ids_restore
        assert int(L * (K / L)) == K
    else:  # any values in [0, L): duplicates, and visible tokens nobody reads
        ids_restore = torch.randint(0, L, (B, L), device=DEVICE)
    ids_restore = ids_restore.to(index_dtype)
    x = leaf(torch.randn(B, P + K, D, device=DEVICE).to(dtype), need[0])
    mask_token = leaf(torch.randn(D, device=DEVICE).to(param_dtype), need[1])
    pos = leaf(torch.randn(P + L, D, device=DEVICE).to(param_dtype), need[2]) if with_pos else None
    if layout is not None:
        ids_restore = transposed(ids_restore)
        assert B < 2 or L < 2 or ids_restore.stride(-1) != 1
    if layout == "all":
        x, mask_token, pos = [None if t is None else strided_leaf(transposed(t), r)
                              for t, r in zip((x, mask_token, pos), need)]

    out = unshuffle_tokens(x, ids_restore, mask_token, pos_embed=pos, num_prefix=P, backend="triton")
    expected = reference.unshuffle_tokens(x, ids_restore, mask_token, pos_embed=pos, num_prefix=P)
    assert out.dtype == dtype and out.shape == (B, P + L, D)
    assert torch.equal(out, expected), "forward must equal the reference bit for bit"

    g = torch.randn_like(out)
    got = grads(out, [x, mask_token, pos], g)
    hi = [None if t is None else leaf(t.double(), t.requires_grad) for t in (x, mask_token, pos)]
    want = grads(reference.unshuffle_tokens(hi[0], ids_restore, hi[1], pos_embed=hi[2], num_prefix=P), hi, g.double())
    reads = int(torch.bincount(ids_restore.long().flatten(), minlength=L).max())  # most reads of one token
    terms = {"dx_vis": reads, "dmask_token": B * L, "dpos": B}
    named = [(n, t) for n, t in zip(terms, (x, mask_token, pos)) if t is not None and t.requires_grad]
    for (name, t), a, e in zip(named, got, want):
        assert a.dtype == t.dtype, f"{name} must come back in its input's dtype"
        assert_close(a, e, dtype=t.dtype, reduction=terms[name], name=name)


UNSHUFFLE_SHAPES = [  # B, L, K, D, P, index dtype
    (2, 16, 4, 33, 1, torch.int64),  # MAE decoder (cls), odd D
    (3, 12, 3, 100, 0, torch.int32),  # no prefix
    (1, 1, 1, 8, 1, torch.int64),  # batch 1, L = K = 1
]


@pytest.mark.parametrize("dtype", triton_dtypes())
@pytest.mark.parametrize("shape", UNSHUFFLE_SHAPES, ids=lambda s: "B{}L{}K{}D{}P{}".format(*s[:5]))
def test_unshuffle_matches_reference(shape, dtype):
    check_unshuffle(*shape[:5], dtype, shape[5])


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_unshuffle_non_permutation(index_dtype):
    check_unshuffle(3, 10, 4, 20, 1, torch.float32, index_dtype, permutation=False)


def test_unshuffle_no_visible_tokens_mixed_dtype_and_partial_grads():
    check_unshuffle(2, 6, 0, 12, 1, torch.float32, torch.int64, permutation=False)  # all mask tokens
    check_unshuffle(2, 8, 2, 24, 1, torch.float16, torch.int32, param_dtype=torch.float32)
    check_unshuffle(2, 8, 2, 24, 1, torch.float32, torch.int64, need=(True, False, False))
    check_unshuffle(2, 8, 2, 24, 2, torch.float32, torch.int32, need=(False, True, False))
    check_unshuffle(2, 8, 2, 24, 0, torch.float32, torch.int64, need=(False, False, True))


@pytest.mark.parametrize("dtype", triton_dtypes())
def test_unshuffle_without_pos_embed(dtype):
    # dx_vis and dmask_token with no pos_embed, with and without a prefix, duplicates included.
    check_unshuffle(2, 16, 4, 33, 1, dtype, torch.int64, with_pos=False)
    check_unshuffle(3, 10, 4, 20, 0, dtype, torch.int32, with_pos=False, permutation=False)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["index", "all"])
def test_unshuffle_strided_grads(layout, index_dtype):
    # d x_vis (segment sums) and d mask_token read ids_restore in the forward's layout: strides (1, B)
    check_unshuffle(3, 7, 3, 5, 1, torch.float32, index_dtype, layout=layout)
    check_unshuffle(3, 9, 4, 7, 2, torch.float32, index_dtype, permutation=False, layout=layout)  # repeats
    check_unshuffle(2, 5, 2, 3, 0, torch.float32, index_dtype, need=(False, True, False), layout=layout)


def test_unshuffle_strided_inputs():
    B, L, K, D, P = 2, 8, 2, 12, 1
    ids = random_masking(B, L, 0.75, device=DEVICE).ids_restore
    x = torch.randn(B, P + K + 2, 2 * D, device=DEVICE)[:, 1:P + K + 1, :D]
    xt = torch.randn(B, D, P + K, device=DEVICE).transpose(1, 2)
    mask_token = torch.randn(1, 1, 2 * D, device=DEVICE)[..., ::2]  # MAE's parameter shape, strided
    pos = torch.randn(P + L, 2 * D, device=DEVICE)[:, D:]
    for inp in (x, xt):
        out = unshuffle_tokens(inp, ids, mask_token, pos_embed=pos, num_prefix=P, backend="triton")
        assert torch.equal(out, reference.unshuffle_tokens(inp, ids, mask_token.reshape(D), pos_embed=pos,
                                                           num_prefix=P))


# ---------------------------------------------------------------- bad input
def test_gather_bad_inputs(checks_mode):
    x, index = torch.randn(2, 6, 4, device=DEVICE), torch.randint(0, 6, (2, 3), device=DEVICE)
    with pytest.raises(IndexError, match=r"gather_tokens: index values must lie in \[0, 6\), found range \[\d+, \d+\]"):
        gather_tokens(x, index + 6, backend="triton")
        sdae_fast.check_errors()
    with pytest.raises(IndexError, match="index values"):
        gather_tokens(x, index - 6, backend="triton")
        sdae_fast.check_errors()
    with pytest.raises(ValueError, match="B·groups"):
        gather_tokens(x, index, groups=2, backend="triton")
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        gather_tokens(x, index, pos_embed=torch.randn(6, 5, device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="prefix must have shape"):
        gather_tokens(x, index, prefix=torch.randn(1, 5, device=DEVICE), backend="triton")
    with pytest.raises(TypeError, match="index must have dtype"):
        gather_tokens(x, index.float(), backend="triton")
    with pytest.raises(ValueError, match="groups"):
        gather_tokens(x, index, groups=0, backend="triton")


def test_int64_indices_past_int32_are_skipped_not_wrapped():
    """2^32 + 3 is out of range: its row reads zeros (gather) or the mask token (unshuffle) and feeds
    no gradient, as any bad index does, until check_errors() names it. The kernels narrowed the
    index to int32 before the range test, so it wrapped to 3 and read row 3."""
    big = 2**32 + 3
    x = torch.randn(1, 5, 4, device=DEVICE, requires_grad=True)
    out = gather_tokens(x, torch.tensor([[big, 1]], device=DEVICE), backend="triton")
    assert torch.equal(out[0, 0], torch.zeros(4, device=DEVICE)) and torch.equal(out[0, 1], x[0, 1])
    out.backward(torch.ones_like(out))
    assert torch.equal(x.grad[0, 3], torch.zeros(4, device=DEVICE)) and torch.equal(x.grad[0, 1], torch.ones(4, device=DEVICE))
    with pytest.raises(IndexError, match=f"found range \\[1, {big}\\]"):
        sdae_fast.check_errors()
    x_vis, token = torch.randn(1, 1 + 3, 4, device=DEVICE), torch.randn(4, device=DEVICE)
    out = unshuffle_tokens(x_vis, torch.tensor([[big, 0, 1, 2]], device=DEVICE), token, num_prefix=1, backend="triton")
    assert torch.equal(out[0, 1], token) and torch.equal(out[0, 2], x_vis[0, 1])
    with pytest.raises(IndexError, match=str(big)):
        sdae_fast.check_errors()


def test_gather_backward_of_an_empty_index():
    """No tokens gathered and no prefix: no grad rows at all, so every gradient is zero (the
    backward's launch geometry divided by zero)."""
    x, pos = (torch.randn(*shape, device=DEVICE, requires_grad=True) for shape in ((2, 5, 8), (5, 8)))
    out = gather_tokens(x, torch.zeros(2, 0, dtype=torch.int64, device=DEVICE), pos_embed=pos, backend="triton")
    assert out.shape == (2, 0, 8)
    dx, dpos = torch.autograd.grad(out.sum(), (x, pos))
    assert torch.equal(dx, torch.zeros_like(x)) and torch.equal(dpos, torch.zeros_like(pos))


def test_unshuffle_bad_inputs(checks_mode):
    x, mt = torch.randn(2, 3, 4, device=DEVICE), torch.randn(4, device=DEVICE)
    ids = random_masking(2, 8, 0.75, device=DEVICE).ids_restore
    with pytest.raises(IndexError, match="unshuffle_tokens: ids_restore values"):
        unshuffle_tokens(x, ids + 8, mt, num_prefix=1, backend="triton")
        sdae_fast.check_errors()
    with pytest.raises(ValueError, match="ids_restore must have B = 2"):
        unshuffle_tokens(x, ids[:1], mt, num_prefix=1, backend="triton")
    with pytest.raises(ValueError, match="mask_token must hold D = 4"):
        unshuffle_tokens(x, ids, torch.randn(5, device=DEVICE), num_prefix=1, backend="triton")
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        unshuffle_tokens(x, ids, mt, pos_embed=torch.randn(8, 4, device=DEVICE), num_prefix=1, backend="triton")
    with pytest.raises(TypeError, match="ids_restore must have dtype"):
        unshuffle_tokens(x, ids.float(), mt, num_prefix=1, backend="triton")
    with pytest.raises(ValueError, match="more than the L"):
        unshuffle_tokens(torch.randn(2, 12, 4, device=DEVICE), ids, mt, num_prefix=1, backend="triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter refusal only exists on the CPU")
def test_forced_triton_refuses_bf16_in_interpreter():
    x = torch.randn(1, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bf16"):
        gather_tokens(x, torch.zeros(1, 2, dtype=torch.int64), backend="triton")


# ---------------------------------------------------------------- GPU: bf16 and ViT shapes
@pytest.mark.gpu
@pytest.mark.parametrize("D", [768, 1024])
def test_gpu_vit_shapes_bf16(D):
    torch.manual_seed(0)
    check_gather(64, 196, D, 49, 1, 1, torch.bfloat16, torch.int64, param_dtype=torch.float32)
    check_gather(64, 196, D, 49, 3, 1, torch.bfloat16, torch.int32)  # SdAE-style folds
    check_unshuffle(64, 196, 49, D, 1, torch.bfloat16, torch.int64, param_dtype=torch.float32)
    check_unshuffle(64, 196, 49, D, 1, torch.float16, torch.int32)


@pytest.mark.gpu
def test_gpu_repeats_and_non_permutation_bf16():
    check_gather(8, 196, 512, 147, 3, 2, torch.bfloat16, torch.int64, repeat=True)
    check_unshuffle(8, 196, 49, 512, 1, torch.bfloat16, torch.int32, permutation=False)


# ---------------------------------------------------------------- the GPU launch configuration
@pytest.fixture(params=[False, True], ids=["int32-offsets", "int64-offsets"])
def gpu_config(monkeypatch, request):
    """Launch with the GPU's block sizes (several programs, D tiles, batch chunks) in the interpreter,
    with int32 address math and with the int64 path that tensors over 2**31 elements take."""
    import sdae_fast.kernels.gather_tokens as gather_module
    import sdae_fast.kernels.unshuffle_tokens as unshuffle_module

    for module in (gather_module, unshuffle_module):
        monkeypatch.setattr(module, "interpreting", lambda: False)
        monkeypatch.setattr(module, "needs_wide_offsets", lambda *tensors: request.param)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on the GPU every test already uses this configuration")
def test_gpu_configuration_in_interpreter(gpu_config):
    check_gather(3, 7, 300, 5, 2, 2, torch.float32, torch.int32, repeat=True)  # 3 D tiles of 128
    check_gather(2, 9, 40, 300, 1, 1, torch.float16, torch.int64)  # several row blocks
    check_unshuffle(5, 9, 3, 300, 2, torch.float32, torch.int64)  # D tiles, 5 batch chunks
    check_unshuffle(3, 12, 4, 20, 1, torch.float16, torch.int32, permutation=False)
    check_gather(3, 7, 300, 5, 2, 1, torch.float32, torch.int64, repeat=True, layout="all")  # strided index, inputs
    check_unshuffle(5, 9, 3, 300, 1, torch.float32, torch.int32, permutation=False, layout="all")
