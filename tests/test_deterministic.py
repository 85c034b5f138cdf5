"""Deterministic gather/unshuffle parameter gradients (issue 11 §7) and bad indices under deferred checks.

``deterministic=True`` (or ``torch.use_deterministic_algorithms(True)``) swaps the fp32 atomics of
the pos_embed / prefix / mask_token gradients for per-chunk partials and one fixed-order sum. In the
interpreter: equal to the reference (float64) to fp32 rounding; on the GPU: bitwise equal run to run.
"""
import pytest
import torch

import sdae_fast
from sdae_fast.ops.masking import gather_tokens, random_masking, unshuffle_tokens
from sdae_fast.testing import assert_close, triton_device

DEVICE = triton_device()
pytestmark = pytest.mark.interpreter


def _gather_grads(deterministic, device=DEVICE, B=3, L=7, D=12, groups=2, M=4):
    torch.manual_seed(0)
    x = torch.randn(B, L, D, device=device, requires_grad=True)
    pos = torch.randn(L, D, device=device, requires_grad=True)
    pre = torch.randn(1, D, device=device, requires_grad=True)
    index = torch.randint(0, L, (B * groups, M), device=device)
    out = gather_tokens(x, index, pos_embed=pos, prefix=pre, groups=groups, backend="triton",
                        deterministic=deterministic)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, pos, pre), g)
    ref = sdae_fast.reference.gather_tokens(x.double(), index, pos_embed=pos.double(), prefix=pre.double(),
                                            groups=groups)
    want = torch.autograd.grad(ref, (x, pos, pre), g.double())
    return got, want


def _unshuffle_grads(deterministic, device=DEVICE, B=3, L=8, D=12, P=1):
    torch.manual_seed(0)
    keep = L // 4
    ids = random_masking(B, L, 0.75, device=device).ids_restore
    x = torch.randn(B, P + keep, D, device=device, requires_grad=True)
    mt = torch.randn(D, device=device, requires_grad=True)
    pos = torch.randn(P + L, D, device=device, requires_grad=True)
    out = unshuffle_tokens(x, ids, mt, pos_embed=pos, num_prefix=P, backend="triton", deterministic=deterministic)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, mt, pos), g)
    ref = sdae_fast.reference.unshuffle_tokens(x.double(), ids, mt.double(), pos_embed=pos.double(), num_prefix=P)
    want = torch.autograd.grad(ref, (x, mt, pos), g.double())
    return got, want


# The most terms behind one gradient element (x, then the parameters), for the tolerance:
# gather: a slot of x feeds at most groups·M rows, pos_embed sums over B·groups·M rows and the
# prefix over B·groups (bounded here by the same B·groups·M);
# unshuffle: x_vis rows are read once, mask_token sums over B·L positions, pos_embed over B.
TERMS = {_gather_grads: (2 * 4, 3 * 2 * 4, 3 * 2 * 4), _unshuffle_grads: (1, 3 * 8, 3)}


def _assert_grads_close(grads_of, got, want):
    for name, a, b, terms in zip(("x", "param 1", "param 2"), got, want, TERMS[grads_of]):
        assert_close(a, b, dtype=torch.float32, reduction=terms, name=name)


@pytest.mark.parametrize("grads_of", [_gather_grads, _unshuffle_grads])
def test_deterministic_equals_reference(grads_of):
    got, want = grads_of(True)
    _assert_grads_close(grads_of, got, want)
    again, _ = grads_of(True)
    assert all(torch.equal(a, b) for a, b in zip(got, again))


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("grads_of", [_gather_grads, _unshuffle_grads])
def test_batch_chunks_as_on_the_gpu(monkeypatch, grads_of, deterministic):
    """The GPU splits the batch into chunks (the interpreter sums it in one): one image a chunk, so
    the deterministic path stores and sums three (NaN-poisoned) partials, the other adds three
    atomics; both against the float64 reference."""
    import sdae_fast.kernels.gather_tokens as gather_kernel
    import sdae_fast.kernels.unshuffle_tokens as unshuffle_kernel

    chunks = []
    for module in (gather_kernel, unshuffle_kernel):
        monkeypatch.setattr(module, "batch_chunk", lambda batch, programs: chunks.append(batch) or 1)
    got, want = grads_of(deterministic)
    assert chunks and set(chunks) == {3}  # the backward's launches, chunked per image
    _assert_grads_close(grads_of, got, want)


def test_use_deterministic_algorithms_is_honoured(monkeypatch):
    seen = []
    import sdae_fast.kernels.gather_tokens as kernel

    real = kernel.segment_sums
    monkeypatch.setattr(kernel, "segment_sums", lambda *a, **k: seen.append(k["deterministic"]) or real(*a, **k))
    torch.use_deterministic_algorithms(True)
    try:
        _gather_grads(None)
    finally:
        torch.use_deterministic_algorithms(False)
    _gather_grads(None)
    assert seen == [True, False]


def test_bad_indices_are_skipped_then_reported():
    """Deferred: an out-of-range index never reaches memory (its rows read zeros) and the next
    check_errors() raises."""
    sdae_fast.set_checks("deferred")
    x = torch.randn(2, 6, 4, device=DEVICE, requires_grad=True)
    index = torch.tensor([[0, 9], [-3, 5]], device=DEVICE)
    out = gather_tokens(x, index, backend="triton")
    assert torch.equal(out[0, 1], torch.zeros(4, device=DEVICE)) and torch.equal(out[1, 0], out[0, 1])
    (dx,) = torch.autograd.grad(out.sum(), x)
    assert dx.sum() == 2 * 4  # only the two good rows feed x
    with pytest.raises(IndexError, match=r"gather_tokens: index values must lie in \[0, 6\), found range \[-3, 9\]"):
        sdae_fast.check_errors()
    sdae_fast.check_errors()  # cleared


@pytest.mark.gpu
@pytest.mark.parametrize("grads_of", [_gather_grads, _unshuffle_grads])
def test_deterministic_bitwise_gpu(grads_of):
    big = dict(B=64, D=768) if grads_of is _unshuffle_grads else dict(B=64, L=196, D=768, M=49)
    runs = [grads_of(True, device="cuda", **big)[0] for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))
