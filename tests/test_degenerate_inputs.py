"""Empty and degenerate inputs for every op (zero rows, one token, all-masked, no positives): each
backend returns the reference's value, or every backend raises the same clear error. Same inputs
for every backend; the float64 reference is the oracle."""
import pytest
import torch

import sdae_fast
from sdae_fast import dispatch, reference
from sdae_fast.testing import assert_close, triton_device

DEVICE = triton_device()
BACKENDS = ["torch", "triton"]


def _both(fn, *tensors):
    """fn(backend, *inputs) per backend on copies that require grad; float64 reference first."""
    results = {}
    for backend in ["reference"] + BACKENDS:
        dtype = torch.float64 if backend == "reference" else torch.float32
        inputs = [t.to(DEVICE, dtype).clone().requires_grad_() for t in tensors]
        out = fn(None if backend == "reference" else backend, *inputs)
        out.sum().backward()
        results[backend] = (out, [t.grad for t in inputs])
    (want, want_grads) = results.pop("reference")
    for backend, (out, grads) in results.items():
        assert_close(out, want, dtype=torch.float32, reduction=64, name=f"{backend} output")
        for i, (g, w) in enumerate(zip(grads, want_grads)):
            assert (g is None) == (w is None), f"{backend} grad {i}: {g is None=} vs reference {w is None=}"
            if w is not None:
                assert_close(g, w, dtype=torch.float32, reduction=64, name=f"{backend} grad {i}")


# ---------------------------------------------------------------------------------------- DINO
def test_dino_loss_zero_width_is_a_clear_error_on_every_backend():
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="must be >= 1, got K = 0"):
            sdae_fast.dino_loss(torch.randn(4, 0), torch.randn(4, 0), torch.zeros(0), backend=backend)


@pytest.mark.parametrize("views,batch,width", [(4, 2, 1), (10, 1, 7), (2, 3, 5)], ids=["K=1", "one image", "globals only"])
def test_dino_loss_degenerate_shapes(views, batch, width):
    s, t = torch.randn(views * batch, width), torch.randn(2 * batch, width)

    def loss(backend, s, t):
        c = torch.zeros(width, dtype=s.dtype, device=s.device)
        if backend is None:
            return reference.dino_loss(s, t.detach(), c, update_center=False)
        return sdae_fast.dino_loss(s, t.detach(), c, update_center=False, backend=backend)

    _both(loss, s, t)


# --------------------------------------------------------------------------------- contrastive
def test_contrastive_one_token_has_no_positive_and_gives_zero():
    z, labels = torch.randn(2, 1, 8), torch.zeros(2, 1, dtype=torch.long)
    fn = lambda b, z: (reference.homologous_contrastive_loss(z, labels.to(z.device)) if b is None else
                       sdae_fast.homologous_contrastive_loss(z, labels.to(z.device), backend=b))
    _both(fn, z)


@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (2, 4, 0)], ids=["no image", "no token", "no feature"])
def test_contrastive_empty_inputs_fall_back_to_the_reference_value(shape):
    z, labels = torch.randn(*shape, device=DEVICE), torch.zeros(shape[:2], dtype=torch.long, device=DEVICE)
    want = reference.homologous_contrastive_loss(z.double(), labels)
    assert_close(sdae_fast.homologous_contrastive_loss(z, labels), want, dtype=torch.float32)
    with pytest.raises(dispatch.BackendUnavailable, match="empty"):
        sdae_fast.homologous_contrastive_loss(z, labels, backend="triton")


# --------------------------------------------------------------------------------- MAE / SdAE
def test_masked_mse_nothing_masked_is_a_clear_error_on_every_backend(checks_mode):
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="selects no patch"):  # a value check: deferred by default
            sdae_fast.masked_mse_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.zeros(2, 5), backend=backend)
            sdae_fast.check_errors()


def test_masked_mse_everything_masked_and_one_patch_row():
    mask = torch.ones(2, 5)
    for p in (8, 2):
        pred, target = torch.randn(2, 5, p), torch.randn(2, 5, p)
        fn = lambda b, x: (reference.masked_mse_loss(x, target.to(x), mask.to(x)) if b is None else
                           sdae_fast.masked_mse_loss(x, target.to(x), mask.to(x), backend=b))
        _both(fn, pred)


def test_cosine_loss_one_token_and_empty_input():
    # One token per image, the cosine over its features (a cosine over a length-1 token axis is
    # sign(p)·sign(t): its gradient vanishes analytically and only rounding noise is left to compare).
    target = torch.randn(3, 1, 8)
    fn = lambda b, x: (reference.cosine_loss(x, target.to(x), dim=-1) if b is None else
                       sdae_fast.cosine_loss(x, target.to(x), dim=-1, backend=b))
    _both(fn, torch.randn(3, 1, 8))
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="empty"):
            sdae_fast.cosine_loss(torch.randn(0, 4, 8), torch.randn(0, 4, 8), backend=backend)


# --------------------------------------------------------------------------------- attention, EMA
def test_topk_attention_no_batch():
    # One token: tests/test_topk_attention.py::test_one_token (dq, dk cancel to rounding there).
    for backend in BACKENDS:
        q = torch.randn(0, 2, 5, 16, device=DEVICE)
        assert sdae_fast.topk_attention(q, q, q, 2, backend=backend).shape == (0, 2, 5, 16)


def test_ema_update_of_nothing_and_of_empty_tensors():
    for backend in BACKENDS:
        sdae_fast.ema_update_([], [], 0.9, backend=backend)
        t = torch.zeros(0, device=DEVICE)
        sdae_fast.ema_update_([t], [torch.zeros(0, device=DEVICE)], 0.9, backend=backend)
        assert t.shape == (0,)


def test_constants_get_no_gradient_on_any_backend():
    """The teacher and centre of dino_loss, the target and mask of masked_mse_loss are constants
    (SPEC §4): no backend gives them a gradient, even when they require one (_both checks it)."""
    student, teacher, center = torch.randn(6, 5), torch.randn(4, 5), torch.randn(5)
    _both(lambda b, s, t, c: sdae_fast.dino_loss(s, t, c, update_center=False, backend=b) if b else
          reference.dino_loss(s, t, c, update_center=False), student, teacher, center)
    pred, target, mask = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.tensor([[1., 0, 1], [0, 1, 0]])
    _both(lambda b, p, t, m: sdae_fast.masked_mse_loss(p, t, m, backend=b) if b else
          reference.masked_mse_loss(p, t, m), pred, target, mask)
