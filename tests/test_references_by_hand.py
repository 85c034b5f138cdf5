"""The EMA and top-K attention references against hand-computed cases and the official formulas
(the masking and loss references have theirs beside their kernels' tests)."""
import math

import torch

from sdae_fast import reference


def test_ema_hand_values_and_single_rounding():
    t, s = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    reference.ema_update_([t], [s], 0.75)
    assert torch.equal(t, torch.tensor([1.5, 2.5]))
    # bf16 teacher of an fp32 student: computed in fp32, rounded once. 1 + 2^-9 is not a bf16 number;
    # rounding each term to bf16 first would give 1.0 + 0.0 and lose the update entirely.
    t16 = torch.tensor([1.0], dtype=torch.bfloat16)
    reference.ema_update_([t16], [torch.tensor([1.0 + 2 ** -6])], 0.875)
    assert t16.item() == torch.tensor(1.0 + 2 ** -9).bfloat16().item()


def test_ema_equals_dinos_update_loop():
    teacher = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    student = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    official = [t.clone() for t in teacher]
    m = 0.996
    for param_k, param_q in zip(official, student):  # DINO main_dino.py, the EMA update of the teacher
        param_k.mul_(m).add_((1 - m) * param_q.detach())
    reference.ema_update_(teacher, student, m)
    for a, b in zip(teacher, official):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


def test_topk_attention_hand_values():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).reshape(1, 1, 3, 2)
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]).reshape(1, 1, 3, 2)
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).reshape(1, 1, 3, 2)
    out = reference.topk_attention(q.double(), k.double(), v.double(), 2, scale=1.0)[0, 0]
    # query 0: scores (1, 0, 2) keep keys 0 and 2.
    w = torch.tensor([math.e ** 1, math.e ** 2], dtype=torch.float64) / (math.e ** 1 + math.e ** 2)
    torch.testing.assert_close(out[0], w[0] * v[0, 0, 0].double() + w[1] * v[0, 0, 2].double())
    # query 1: scores (0, 1, 0): the 2nd largest is 0, tied by keys 0 and 2: all three keys kept.
    p = torch.softmax(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), 0)
    torch.testing.assert_close(out[1], p @ v[0, 0].double())


def test_topk_attention_dense_when_topk_reaches_n():
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    dense = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v
    for topk in (9, 20):
        torch.testing.assert_close(reference.topk_attention(q, k, v, topk), dense)


def test_topk_attention_gradient_treats_kept_set_as_constant():
    q, k, v = (torch.randn(1, 1, 6, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = reference.topk_attention(q, k, v, 2)
    s = (q @ k.transpose(-1, -2)) / 2.0
    keep = s >= s.topk(2, dim=-1).values[..., -1:]
    manual = torch.softmax(s.masked_fill(~keep.detach(), float("-inf")), -1) @ v
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    expected = torch.autograd.grad(manual, (q, k, v), g)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_references_keep_fp32_math_under_autocast():
    """A model's bf16 autocast region must not recast the references' fp32 matmuls: the contrastive
    similarities and the top-K scores stay fp32, the loss an fp32 scalar equal to the one outside."""
    z, labels = torch.randn(2, 19, 40).to(torch.bfloat16), torch.randint(0, 3, (2, 19))
    q, k, v = (torch.randn(1, 2, 19, 24).to(torch.bfloat16) for _ in range(3))
    outside = reference.homologous_contrastive_loss(z, labels), reference.topk_attention(q, k, v, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = reference.homologous_contrastive_loss(z, labels), reference.topk_attention(q, k, v, 5)
    assert inside[0].dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(inside, outside))
    meta = reference.topk_attention(*(t.to("meta") for t in (q, k, v)), 5)  # shape inference still works
    assert meta.shape == q.shape and meta.dtype == q.dtype
