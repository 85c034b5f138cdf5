"""torch.library.opcheck of every op in torch.ops.sdae_fast (issue 11 §2): schema (declared
mutation and aliasing), fake tensors, autograd registration and aot_dispatch_dynamic.

The public ops run their reference here; the Triton kernel ops run in the interpreter (as opaque
custom ops there, see sdae_fast.library). Inputs are tiny: opcheck runs each op many times.
"""
import pytest
import torch
from torch.library import opcheck

import sdae_fast  # noqa: F401  (registers the public ops)
from sdae_fast.dispatch import triton_why_not
from sdae_fast.testing import triton_device

ops = torch.ops.sdae_fast


def _leaf(*shape, device="cpu"):
    return torch.randn(*shape, device=device).requires_grad_()


def _inputs(head_dim, device="cpu"):
    """x, pos, prefix, index (2 groups, a repeat), ids_restore, q, k, v, pred, target, mask."""
    x, pos, pre = _leaf(2, 5, 4, device=device), _leaf(5, 4, device=device), _leaf(1, 4, device=device)
    index = torch.tensor([[0, 3], [4, 4], [2, 1], [0, 0]], device=device)
    ids = torch.stack([torch.randperm(6) for _ in range(2)]).to(device)
    qkv = [_leaf(1, 2, 5, head_dim, device=device) for _ in range(3)]
    return (x, pos, pre, index, ids, *qkv, _leaf(2, 3, 4, device=device), torch.randn(2, 3, 4, device=device),
            torch.tensor([[1., 0, 1], [0, 1, 0]], device=device))


def public_cases():
    x, pos, pre, index, ids, q, k, v, pred, target, mask = _inputs(head_dim=4)
    return {
        "gather_tokens": (ops.gather_tokens.default, (x, index), dict(pos_embed=pos, prefix=pre, groups=2)),
        "unshuffle_tokens": (ops.unshuffle_tokens.default, (_leaf(2, 3, 4), ids, _leaf(4)),
                             dict(pos_embed=_leaf(7, 4), num_prefix=1)),
        "topk_attention": (ops.topk_attention.default, (q, k, v, 2), {}),
        "cosine_loss": (ops.cosine_loss.default, (pred, target), dict(dim=1, standardize_dim=2)),  # SdAE's axes
        "masked_mse_loss": (ops.masked_mse_loss.default, (pred, target, mask), {}),
        "dino_loss": (ops.dino_loss.default, (_leaf(6, 8), torch.randn(4, 8), torch.zeros(8)), dict(num_global=2)),
        "homologous_contrastive_loss": (ops.homologous_contrastive_loss.default,
                                        (_leaf(2, 5, 4), torch.tensor([[0, 0, 1, 1, 0], [1, 2, 2, 1, 0]])), {}),
    }


@pytest.mark.parametrize("name", list(public_cases()))
def test_public_op_reference(name):
    op, args, kwargs = public_cases()[name]
    opcheck(op, args, dict(kwargs, backend="torch"))


def _float64(a):
    """A floating tensor as a float64 leaf (keeping requires_grad); lists element-wise; others as is."""
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().double().requires_grad_(a.requires_grad)
    return [_float64(x) for x in a] if isinstance(a, list) else a


@pytest.mark.parametrize("name", list(public_cases()))
def test_public_op_reference_float64(name):
    """float64 (the fidelity-check dtype) runs on the reference: the same registration holds."""
    op, args, kwargs = public_cases()[name]
    opcheck(op, tuple(_float64(a) for a in args), dict(kwargs, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_op(dtype):
    teacher, student = [[torch.randn(3, dtype=dtype), torch.randn(2, 2, dtype=dtype)] for _ in range(2)]
    opcheck(ops.ema_update_.default, (teacher, student, 0.9, None, "torch", -1))
    opcheck(ops.ema_update_.default, (teacher, student, 0.0, torch.tensor(0.5, dtype=dtype), "torch", -1))


DEVICE = triton_device()  # the GPU (kernel ops are triton_ops there), else the CPU interpreter
interpreter = pytest.mark.skipif(bool(triton_why_not([torch.empty(0, device=DEVICE)])),
                                 reason="needs Triton (GPU or interpreter)")


def kernel_cases():
    x, pos, pre, index, ids, q, k, v, pred, target, mask = _inputs(head_dim=16, device=DEVICE)
    leaf = lambda *shape: _leaf(*shape, device=DEVICE)  # noqa: E731
    return {
        "gather": (ops.gather_tokens_triton.default, (x, index, pos, pre, 2, False)),
        "gather_deterministic": (ops.gather_tokens_triton.default, (x, index, pos, None, 2, True)),
        "unshuffle": (ops.unshuffle_tokens_triton.default, (leaf(2, 3, 4), ids, leaf(4), leaf(7, 4), 1, False)),
        "unshuffle_deterministic": (ops.unshuffle_tokens_triton.default,
                                    (leaf(2, 3, 4), ids, leaf(4), leaf(7, 4), 1, True)),
        "cosine": (ops.cosine_loss_triton.default, (pred, target, 1, True, 1, 1e-8, 1e-6, True)),
        "cosine_two_axes": (ops.cosine_loss_triton.default, (pred, target, 1, True, 2, 1e-8, 1e-6, True)),
        "masked_mse": (ops.masked_mse_loss_triton.default, (pred, target, mask, True, True)),
        "dino": (ops.dino_loss_triton.default, (leaf(6, 8), torch.randn(4, 8, device=DEVICE),
                                                torch.zeros(8, device=DEVICE), 0.1, 0.04, 2, True, None, None)),
        "contrastive": (ops.homologous_contrastive_loss_triton.default,
                        (leaf(2, 5, 4), torch.tensor([[0, 0, 1, 1, 0], [1, 2, 2, 1, 0]], device=DEVICE), 0.07,
                         True)),
        "topk_attention": (ops.topk_attention_triton.default, (q, k, v, 2, 0.25)),
        "index_check": (ops.check_values_triton.default,
                        (index, torch.zeros(4, 5, dtype=torch.int64, device=DEVICE), 0, 4, 1, False)),
    }


KERNEL_CASES = ("gather", "gather_deterministic", "unshuffle", "unshuffle_deterministic", "cosine", "cosine_two_axes", "masked_mse", "dino",
                "contrastive", "topk_attention", "index_check")


def _half(a):
    """A floating tensor as an fp16 leaf (keeping requires_grad); others as is."""
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.detach().half().requires_grad_(a.requires_grad)
    return a


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", KERNEL_CASES)
def test_triton_kernel_op(name, dtype):
    """fp16 too: a fake kernel must give a 16-bit input's outputs their real dtypes (an fp32 loss,
    fp32 statistics beside 16-bit gradients)."""
    import sdae_fast.kernels.contrastive_loss  # noqa: F401  (kernel ops register on import)
    import sdae_fast.kernels.cosine_loss  # noqa: F401
    import sdae_fast.kernels.dino_loss  # noqa: F401
    import sdae_fast.kernels.gather_tokens  # noqa: F401
    import sdae_fast.kernels.masked_mse_loss  # noqa: F401
    import sdae_fast.kernels.topk_attention  # noqa: F401
    import sdae_fast.kernels.unshuffle_tokens  # noqa: F401
    import sdae_fast.kernels.value_checks  # noqa: F401

    op, args = kernel_cases()[name]
    opcheck(op, args if dtype == torch.float32 else tuple(_half(a) for a in args))


@interpreter
@pytest.mark.parametrize("name", list(public_cases()))
def test_public_op_triton(name):
    """The public ops dispatched to Triton: their autograd goes through the kernel ops' own."""
    op, args, kwargs = public_cases()[name]
    opcheck(op, tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args),
            dict(kwargs, backend="triton"))


@interpreter
@pytest.mark.parametrize("name", ["cosine_loss", "masked_mse_loss", "dino_loss", "gather_tokens", "unshuffle_tokens",
                                  "topk_attention", "homologous_contrastive_loss"])
def test_fused_ops_refuse_a_double_backward(name):
    """The Liger-style losses write d loss / d input in the forward, a constant to autograd, and the
    other kernels' backward ops have no derivative: a second derivative through any of them must
    fail loudly, naming the op and the way out, not come back as zero or a generic autograd error."""
    op, args, kwargs = public_cases()[name]
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = dict(kwargs, update_center=False) if name == "dino_loss" else kwargs  # the same centre each call
    x = args[0].detach().requires_grad_()
    (g,) = torch.autograd.grad(op(x, *args[1:], **kwargs, backend="triton").sum(), x)  # first order: fine
    refused = f"sdae_fast::{name}_triton: no double backward through the fused kernel"
    with pytest.raises(NotImplementedError, match=refused):
        torch.autograd.grad(op(x, *args[1:], **kwargs, backend="triton").sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(op(x, *args[1:], **kwargs, backend="torch").sum(), x, create_graph=True)
    # The reference serves it (the gather and unshuffle are linear: their gradient is a constant).
    assert torch.allclose(h.detach(), g, atol=1e-5)
    assert h.requires_grad or name in ("gather_tokens", "unshuffle_tokens")


@interpreter
@pytest.mark.parametrize("backend", ["triton"] + (["cuda"] if torch.cuda.is_available() else []))
def test_ema_op_with_a_plan(backend):
    """An EmaUpdate's plan (pointer tables made once) serves the tensors it was made for; handed
    other tensors (functionalization's copies under aot_dispatch) the op pairs those instead."""
    from sdae_fast.ops.ema import EmaUpdate

    teacher, student = [[torch.randn(3, device=DEVICE), torch.randn(4097, device=DEVICE)] for _ in range(2)]
    update = EmaUpdate(teacher, student, backend=backend)
    assert update._plan >= 0
    opcheck(ops.ema_update_.default, (teacher, student, 0.9, None, backend, update._plan))
    opcheck(ops.ema_update_.default, (teacher, student, 0.0, torch.tensor(0.5, device=DEVICE), backend, update._plan))
    # opcheck copies its inputs, so a plan that ignored them would pass it: check that directly too.
    copies, expected = [t.clone() for t in teacher], [t.clone() for t in teacher]
    ops.ema_update_.default(copies, student, 0.9, None, backend, update._plan)
    sdae_fast.ema_update_(expected, student, 0.9, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(copies, expected))
