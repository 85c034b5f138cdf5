"""Triton top-K attention vs the reference: forward, dq, dk, dv; ties; large logits; bad inputs.

Selection is a discontinuous function of the scores: computed in another summation order a random
fp32 score can move by an ulp and flip a near-tie at τ. So the exact-selection tests use inputs
whose scores are exact in any order and any precision (q, k entries = small integers / 4, scale a
power of two): the fp32/fp16 kernel and the float64 reference then keep the very same keys, ties
included, and any difference is the kernel's rounding. Integer inputs make ties common on purpose.
Generic random inputs (default scale) are compared with the float64 reference as well; their
near-ties are ulp-rare and the seed is fixed.
"""
import pytest
import torch
import triton

from sdae_fast import dispatch
from sdae_fast.ops.attention import topk_attention
from sdae_fast.reference.attention import topk_attention as reference
from sdae_fast.testing import assert_close, tolerance, triton_device, triton_dtypes

DEVICE = triton_device()
EXACT_SCALE = 0.125  # a power of two keeps every exact dot product exact after scaling


def exact_qk(b, h, n, d, dtype, magnitude=0.25):
    """Small integers times a power of two: every score is exact whatever the summation order."""
    return [(torch.randint(-4, 5, (b, h, n, d)) * magnitude).to(dtype).to(DEVICE) for _ in range(2)]


def run_and_compare(q, k, v, topk, scale=None, reduction=None):
    """Forward and all three gradients of the Triton backend vs the float64 reference."""
    n, d = q.shape[-2:]
    reduction = reduction or n * d  # each score sums d products; each output / gradient sums N terms
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = topk_attention(q, k, v, topk, scale=scale, backend="triton")
    d_out = torch.randn_like(out)
    out.backward(d_out)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = reference(q64, k64, v64, topk, scale=scale)
    expected.backward(d_out.double())
    assert_close(out, expected, dtype=q.dtype, reduction=reduction, name="out")
    magnitude = cancelling_magnitudes(q64, k64, v64, d_out.double(), topk, scale)
    assert_close(v.grad, v64.grad, dtype=q.dtype, reduction=reduction, name="dv")
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad)):
        assert_close_cancelling(got, want, magnitude[name], dtype=q.dtype, reduction=reduction, name=name)


def assert_close_cancelling(got, want, magnitude, *, dtype, reduction, name):
    """dq, dk sum dS = P ∘ (dP - D) terms that cancel, exactly to 0 when a row keeps one key or
    tied copies of one key; D itself comes from O rounded to ``dtype`` (as in flash attention).
    The forward error of such a sum is bounded by tol · Σ|terms| (``magnitude``), not by the size
    of the result, so that scale joins assert_close's |e| + max|e| with the same dtype tolerance.
    NaN and infinities must sit exactly where the reference has them (NaN inputs); the bound
    applies to the finite rest, where a NaN magnitude (a NaN row's terms) counts as 0."""
    got, want, magnitude = got.detach().double().cpu(), want.detach().double().cpu(), magnitude.double().cpu()
    assert torch.equal(got.isnan(), want.isnan()), (
        f"{name}: NaN at {int(got.isnan().sum())} elements, reference at {int(want.isnan().sum())}; first "
        f"mismatch {(got.isnan() != want.isnan()).nonzero()[0].tolist()}")
    finite = torch.isfinite(want)
    assert torch.equal(got[want.isinf()], want[want.isinf()]), f"{name}: infinities differ"
    got, want, magnitude = got[finite], want[finite], magnitude[finite].nan_to_num(nan=0.0)
    if want.numel() == 0:
        return
    tol = tolerance(dtype, reduction)
    err = (got - want).abs()
    bound = tol * (want.abs() + want.abs().max() + magnitude)
    if (err > bound).any():
        worst = int((err - bound).argmax())
        raise AssertionError(f"{name} ({dtype}): max error {err.max():.3e}, worst {got.flatten()[worst].item()!r} "
                             f"vs {want.flatten()[worst].item()!r} (bound {bound.flatten()[worst]:.3e})")


def cancelling_magnitudes(q, k, v, d_out, topk, scale):
    """Σ|terms| of dq and dk in float64: scale · (P ∘ (|dP| + Σ_d|dO||O|)) |K| and its transpose."""
    with torch.no_grad():
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        s = scale * q @ k.transpose(-1, -2)
        if topk < s.shape[-1]:
            s = s.masked_fill(s < s.topk(topk, dim=-1).values[..., -1:], float("-inf"))
        p = s.softmax(-1)
        d_p = d_out @ v.transpose(-1, -2)
        delta = (d_out.abs() * (p @ v).abs()).sum(-1, keepdim=True)
        terms = p * (d_p.abs() + delta)
        return {"dq": scale * terms @ k.abs(), "dk": scale * terms.transpose(-1, -2) @ q.abs()}


def _topks(n):
    return sorted({1, max(1, n // 4), max(1, n - 1), n, n + 5})


SMALL = [(n, topk) for n in (2, 7, 50) for topk in _topks(n)]


@pytest.mark.parametrize("dtype", triton_dtypes()[:2], ids=str)
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("n,topk", SMALL)
def test_exact_selection_small(n, topk, d, dtype):
    q, k = exact_qk(1, 2, n, d, dtype)
    v = torch.randn(1, 2, n, d).to(dtype).to(DEVICE)
    run_and_compare(q, k, v, topk, scale=EXACT_SCALE)


@pytest.mark.parametrize("dtype", triton_dtypes()[:2], ids=str)
@pytest.mark.parametrize("d", [20, 33, 80])
def test_head_dims_that_pad(d, dtype):
    """Head dims below their power-of-two tile (ViT-H's 80 pads to 128; 20 and 33 leave partial
    16-wide chunks in the fp32 dots): the masked head-dim columns, forward and every gradient."""
    q, k = exact_qk(2, 1, 23, d, dtype)
    v = torch.randn(2, 1, 23, d).to(dtype).to(DEVICE)
    run_and_compare(q, k, v, 6, scale=EXACT_SCALE)


@pytest.mark.parametrize("dtype", triton_dtypes()[:2], ids=str)
@pytest.mark.parametrize("n", [197, 257])
def test_exact_selection_long_rows(n, dtype):
    """N = 257 pads to 512: the selection holds the row as two register tiles of 256 keys."""
    q, k = exact_qk(1, 1, n, 64, dtype)
    v = torch.randn(1, 1, n, 64).to(dtype).to(DEVICE)
    run_and_compare(q, k, v, n // 4, scale=EXACT_SCALE)


@pytest.mark.parametrize("dtype", triton_dtypes()[:2], ids=str)
def test_rows_longer_than_one_tile(monkeypatch, dtype):
    """Rows past N_MAX_ONE_TILE take the path that recomputes score chunks per selection pass;
    lowering the limit sends N = 100 (2 chunks of 64 keys) there."""
    from sdae_fast.kernels import topk_attention as kernel

    monkeypatch.setattr(kernel, "N_MAX_ONE_TILE", 64)
    q, k = exact_qk(1, 1, 100, 32, dtype)
    v = torch.randn(1, 1, 100, 32).to(dtype).to(DEVICE)
    run_and_compare(q, k, v, 25, scale=EXACT_SCALE)


@pytest.mark.parametrize("tile_n,n", [(32, 50), (16, 50)])
def test_row_held_as_several_register_tiles(monkeypatch, tile_n, n):
    """Smaller tiles send short rows through the 2- and 4-tile selection (N = 785 or 1024 on the GPU)."""
    from sdae_fast.kernels import topk_attention as kernel

    monkeypatch.setattr(kernel, "TILE_N", tile_n)
    q, k = exact_qk(1, 1, n, 32, torch.float32)
    v = torch.randn(1, 1, n, 32, device=DEVICE)
    for topk in (1, 12, 49):
        run_and_compare(q, k, v, topk, scale=EXACT_SCALE)


def test_backward_with_another_dot_shape_keeps_the_boundary_key(monkeypatch):
    """Random scores recomputed in 32-key chunks round differently from the forward's 128-key tile;
    without the saved boundary column the key at τ drops out of whole rows of the backward."""
    from sdae_fast.kernels import topk_attention as kernel

    monkeypatch.setattr(kernel, "INTERPRETER_BWD_CHUNK", 32)
    q, k, v = (torch.randn(1, 2, 100, 64, device=DEVICE) for _ in range(3))
    run_and_compare(q, k, v, 25)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on the GPU the autotuned tiles run")
@pytest.mark.parametrize("block_m", [16, 32])
def test_fp32_gpu_row_tiles_in_interpreter(monkeypatch, block_m):
    """fp32's GPU tiles (topk_attention_configs: 16-row forward, 16 x 32 dK/dV, 16- or 32-row dQ
    with 32-key chunks) in the interpreter, where the default is 64 rows."""
    from sdae_fast.kernels import topk_attention as kernel

    monkeypatch.setattr(kernel, "INTERPRETER_BLOCK_M", block_m)
    monkeypatch.setattr(kernel, "INTERPRETER_BWD_CHUNK", 32)
    q, k, v = (torch.randn(1, 2, 100, 64, device=DEVICE) for _ in range(3))
    run_and_compare(q, k, v, 25)


@pytest.mark.parametrize("n,topk", [(300, 75), (600, 1)])
def test_two_launch_forward_of_long_16_bit_rows(monkeypatch, n, topk):
    """N_PAD 512-1024 in 16 bits: a selection launch writes τ, an attend launch reads it back."""
    from sdae_fast.kernels import topk_attention as kernel

    assert kernel.fwd_stages(triton.next_power_of_2(n), "tf32", True) == (1, 2)
    monkeypatch.setattr(kernel, "INTERPRETER_TWO_STAGE", True)
    q, k = exact_qk(1, 2, n, 32, torch.float16)
    run_and_compare(q, k, torch.randn(1, 2, n, 32, device=DEVICE).half(), topk, scale=EXACT_SCALE)


@pytest.mark.parametrize("dtype", triton_dtypes(), ids=str)
def test_one_token(dtype):
    """N = 1: the row keeps its only key, out = v; dq and dk are 0 up to the rounding of dP − D."""
    q, k = exact_qk(2, 3, 1, 16, dtype)
    run_and_compare(q, k, torch.randn(2, 3, 1, 16, device=DEVICE).to(dtype), 1, scale=EXACT_SCALE)


@pytest.mark.parametrize("n,topk", [(7, 2), (50, 12), (197, 49)])
def test_random_inputs_default_scale(n, topk):
    q, k, v = (torch.randn(1, 2, n, 64, device=DEVICE) for _ in range(3))
    run_and_compare(q, k, v, topk)


@pytest.mark.parametrize("topk", [1, 3, 8, 16])
def test_ties_at_threshold_keep_every_tied_key(topk):
    """Keys repeated 4 times: every threshold lands on a tied group, which must be kept whole."""
    n, d = 32, 32
    q, k = exact_qk(2, 1, n, d, torch.float32)
    k = k[:, :, : n // 4].repeat_interleave(4, dim=2).contiguous()
    v = torch.randn(2, 1, n, d, device=DEVICE)
    run_and_compare(q, k, v, topk, scale=EXACT_SCALE)
    # More keys than topk survive: the tie really is kept, as the reference says.
    s = (q @ k.transpose(-1, -2)).double()
    tau = s.topk(topk, dim=-1).values[..., -1:]
    assert ((s >= tau).sum(-1) > topk).any()


def test_all_keys_equal_keeps_all():
    q, _ = exact_qk(1, 1, 9, 32, torch.float32)
    k = torch.ones(1, 1, 9, 32, device=DEVICE)
    v = torch.randn(1, 1, 9, 32, device=DEVICE)
    run_and_compare(q, k, v, 2, scale=EXACT_SCALE)


@pytest.mark.parametrize("dtype", triton_dtypes()[:2], ids=str)
def test_large_magnitude_logits(dtype):
    """Logits in the thousands: the selection is exact and the softmax must not overflow."""
    q, k = exact_qk(1, 2, 50, 64, dtype, magnitude=8.0)
    v = torch.randn(1, 2, 50, 64).to(dtype).to(DEVICE)
    run_and_compare(q, k, v, 12, scale=EXACT_SCALE)


def test_negative_and_zero_scores_select_exactly():
    """Thresholds at 0 and below exercise the sign handling of the order-preserving key."""
    q = torch.zeros(1, 1, 16, 32, device=DEVICE)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, 16, 32, device=DEVICE)
    k[..., :5, 0] = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5])
    v = torch.randn(1, 1, 16, 32, device=DEVICE)
    for topk in (1, 2, 3, 5, 15):
        run_and_compare(q, k, v, topk, scale=1.0)


def test_strided_inputs_from_fused_qkv():
    """q, k, v as views of one (B, N, 3, H, d) tensor, as the timm block produces them."""
    b, n, h, d = 1, 20, 2, 32
    qkv = (torch.randint(-4, 5, (b, n, 3, h, d)) * 0.25).to(DEVICE).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    assert not q.is_contiguous()
    run_and_compare(q, k, v, 5, scale=EXACT_SCALE)


# ----------------------------------------------------------------------------------------------
# NaN and infinite inputs: the reference's NaN rows, exactly
# ----------------------------------------------------------------------------------------------
# What the reference does (the kernel must match it element for element, forward and gradients):
# a NaN score is never below τ (torch.topk ranks NaN highest; NaN < τ is false, and a NaN τ keeps
# the whole row), so a row with a NaN or +inf score is NaN in every output column and its softmax
# row is NaN at every key: dv is NaN everywhere in that head. Gradients through the kept-set mask
# are exactly 0 at dropped keys, so dk is NaN only on keys some NaN row keeps, or through 0 · NaN
# in dS @ Q (a NaN q). NaN in v reaches every row's output column through P @ V's 0 · NaN, kept
# or not, and every dS through D. (The tests above hold the finite fast path.)
NAN, INF = float("nan"), float("inf")
NONFINITE_CASES = {
    "q element": ("q", (0, 0, 3, 5), NAN),      # one query row
    "q row": ("q", (0, 1, 6), NAN),
    "k row": ("k", (0, 0, 2), NAN),             # every query's score against key 2
    "k element": ("k", (0, 1, 5, 0), NAN),
    "k two rows": ("k", (0, 0, slice(2, 4)), NAN),  # topk <= 2: τ is NaN, the row keeps all keys
    "v element": ("v", (0, 0, 2, 1), NAN),
    "v row": ("v", (0, 1, 4), NAN),
    "q +inf": ("q", (0, 0, 3, 0), INF),         # scores +inf, -inf and inf · 0 = NaN in one row
    "k -inf": ("k", (0, 1, 2), -INF),
}


def nonfinite_inputs(n, case, d=32):
    q, k = exact_qk(1, 2, n, d, torch.float32)
    v = torch.randn(1, 2, n, d, device=DEVICE)
    name, index, value = NONFINITE_CASES[case]
    {"q": q, "k": k, "v": v}[name][index] = value
    return q, k, v


@pytest.mark.parametrize("topk", [1, 2, 5, 8])  # N = 8: top-k and dense
@pytest.mark.parametrize("case", sorted(NONFINITE_CASES))
def test_nonfinite_inputs_give_the_reference_nans(case, topk):
    q, k, v = nonfinite_inputs(8, case)
    run_and_compare(q, k, v, topk, scale=EXACT_SCALE)


def test_nan_key_fills_the_row_instead_of_displacing_a_key():
    """The audit's case: a NaN key made the kernel attend to topk - 1 real keys, all finite."""
    q, k, v = nonfinite_inputs(4, "k row")
    for topk in (2, 4):
        out = topk_attention(q, k, v, topk, backend="triton")
        assert out[0, 0].isnan().all() and not out[0, 1].isnan().any()


@pytest.mark.parametrize("path", ["register tiles", "recomputed chunks"])
@pytest.mark.parametrize("case", ["k two rows", "q row", "v element", "q +inf"])
def test_nonfinite_inputs_across_chunks(monkeypatch, path, case):
    """NaN rows over several softmax/backward chunks: 4 register tiles of 16 keys, or rows past
    N_MAX_ONE_TILE whose selection recomputes 64-key chunks per pass."""
    from sdae_fast.kernels import topk_attention as kernel

    if path == "register tiles":
        monkeypatch.setattr(kernel, "TILE_N", 16)
        n = 50
    else:
        monkeypatch.setattr(kernel, "N_MAX_ONE_TILE", 64)
        n = 100
    q, k, v = nonfinite_inputs(n, case)
    if case == "k two rows":  # NaN keys in two different chunks
        k[0, 0, n - 3] = NAN
    for topk in (1, 12, n):
        run_and_compare(q, k, v, topk, scale=EXACT_SCALE)


# ----------------------------------------------------------------------------------------------
# Validation and backend refusal
# ----------------------------------------------------------------------------------------------
def _qkv(*shape, dtype=torch.float32):
    return [torch.randn(*shape, dtype=dtype) for _ in range(3)]


def test_topk_below_one_is_an_error():
    q, k, v = _qkv(1, 1, 4, 8)
    with pytest.raises(ValueError, match="topk must be an int >= 1"):
        topk_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="topk must be an int"):
        topk_attention(q, k, v, 2.0)


def test_shape_dtype_device_layout_errors():
    q, k, v = _qkv(1, 1, 4, 8)
    with pytest.raises(ValueError, match="share one shape"):
        topk_attention(q, k[..., :3, :], v, 2)
    with pytest.raises(ValueError, match="dimensions"):
        topk_attention(q[0], k[0], v[0], 2)
    with pytest.raises(TypeError, match="one dtype"):
        topk_attention(q, k.half(), v, 2)
    with pytest.raises(ValueError, match="one device"):
        topk_attention(q, k.to("meta"), v, 2)
    square = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        topk_attention(square.transpose(-1, -2), square, square, 2)


def test_triton_refuses_wide_heads():
    q, k, v = (t.to(DEVICE) for t in _qkv(1, 1, 4, 256))
    with pytest.raises(dispatch.BackendUnavailable, match="head dim 256"):
        topk_attention(q, k, v, 2, backend="triton")


def test_float64_runs_on_the_reference_and_triton_refuses_it():
    # float64 is for fidelity checks: the reference computes in it; the fp32 kernel says why not.
    q, k, v = _qkv(1, 1, 4, 32, dtype=torch.float64)
    out = topk_attention(q, k, v, 2)
    assert out.dtype == torch.float64 and torch.equal(out, reference(q, k, v, 2))
    with pytest.raises(dispatch.BackendUnavailable, match="float64 inputs run on the torch reference only"):
        topk_attention(q, k, v, 2, backend="triton")


# ----------------------------------------------------------------------------------------------
# GPU: bf16, long rows, head dims 80 and 128
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("n,topk", [(197, 49), (257, 64), (785, 196), (1024, 256), (1500, 375), (197, 197)])
def test_gpu_shapes(n, topk, d, dtype):
    from sdae_fast.kernels.topk_attention import FP32_MAX_N

    q, k = exact_qk(2, 3, n, d, dtype)
    v = torch.randn(2, 3, n, d, device="cuda").to(dtype)
    if dtype == torch.float32 and n > FP32_MAX_N:  # would spill (tests/test_sm90_static.py): refused
        with pytest.raises(dispatch.BackendUnavailable, match="spill"):
            topk_attention(q, k, v, topk, backend="triton")
        return
    run_and_compare(q, k, v, topk, scale=EXACT_SCALE)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 80])
def test_gpu_random_bf16(d):
    q, k, v = (torch.randn(4, 12, 197, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    run_and_compare(q, k, v, 49)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_duplicate_keys_with_rounded_scores(dtype):
    """Every key twice, random (rounded) scores: each threshold falls on an exact tie of two copies,
    whose scores round alike in any pass. The backward's recomputed scores must keep both copies,
    as the forward and the reference do. (In the CPU interpreter, numpy's dot rounds by tile shape,
    so a backward with another tile can lose the copy that is not the boundary key: GPU-only check.)"""
    n = 66 if dtype == torch.float32 else 198
    q, v = (torch.randn(2, 3, n, 64, device="cuda").to(dtype) for _ in range(2))
    k = torch.randn(2, 3, n // 2, 64, device="cuda").to(dtype).repeat_interleave(2, dim=2)
    run_and_compare(q, k, v, 7)
