"""TopKAttention: equals the op applied to its own weights; topk as int, fraction or None."""
import pytest
import torch
import torch.nn.functional as F

from sdae_fast.models.topk_attention import TopKAttention, resolve_topk
from sdae_fast.reference.attention import topk_attention as reference
from sdae_fast.testing import assert_close, triton_device

DEVICE = triton_device()


def by_hand(block, x, topk):
    """The block's computation written out from its weights, with the reference op."""
    b, n, c = x.shape
    h, d = block.num_heads, block.head_dim
    q, k, v = (x @ block.qkv.weight.T + block.qkv.bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    if topk is None:
        o = F.scaled_dot_product_attention(q, k, v)
    else:
        o = reference(q, k, v, topk, scale=d ** -0.5)
    return o.transpose(1, 2).reshape(b, n, c) @ block.proj.weight.T + block.proj.bias


def test_resolve_topk():
    assert resolve_topk(None, 197) is None
    assert resolve_topk(49, 197) == 49
    assert resolve_topk(0.25, 197) == 49  # MixedAE r = 4
    assert resolve_topk(0.125, 785) == 98
    assert resolve_topk(1.0, 197) == 197
    assert resolve_topk(1e-6, 197) == 1
    for bad, err in ((0, ValueError), (-3, ValueError), (0.0, ValueError), (1.5, ValueError), (True, TypeError),
                     ("4", TypeError)):
        with pytest.raises(err):
            resolve_topk(bad, 197)
    with pytest.raises(ValueError, match="fraction"):
        TopKAttention(64, num_heads=2, topk=2.0)


@pytest.mark.parametrize("topk,keep", [(5, 5), (0.25, 5), (0.5, 10)])
def test_block_equals_reference_from_its_weights(topk, keep):
    block = TopKAttention(64, num_heads=2, topk=topk, backend="torch")
    x = torch.randn(2, 20, 64)
    assert_close(block(x), by_hand(block, x, keep).detach(), reduction=64 * 20)


def test_none_and_full_topk_are_dense_sdpa():
    x = torch.randn(2, 20, 64)
    for topk in (None, 20, 50, 1.0):
        block = TopKAttention(64, num_heads=2, topk=topk)
        assert_close(block(x), by_hand(block, x, None).detach(), reduction=64 * 20)


def test_topk_is_per_layer_and_per_call_length():
    layers = [TopKAttention(64, num_heads=2, topk=t, backend="torch") for t in (0.25, 3, None)]
    for n in (12, 20):
        x = torch.randn(1, n, 64)
        for layer, keep in zip(layers, (resolve_topk(0.25, n), 3, None)):
            assert_close(layer(x), by_hand(layer, x, keep).detach(), reduction=64 * n)


def test_triton_backend_matches_torch_backend_with_gradients():
    """Forward and parameter/input gradients through the fused kernel (interpreter on CPU)."""
    torch.manual_seed(1)
    fused = TopKAttention(64, num_heads=2, topk=0.25, backend="triton").to(DEVICE)
    plain = TopKAttention(64, num_heads=2, topk=0.25, backend="torch").to(DEVICE)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(1, 24, 64, device=DEVICE)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [m(xi) for m, xi in zip((fused, plain), xs)]
    assert_close(outs[0], outs[1].detach(), reduction=64 * 24)
    g = torch.randn_like(outs[0])
    for o in outs:
        o.backward(g)
    assert_close(xs[0].grad, xs[1].grad, reduction=64 * 24 * 3, name="dx")
    for (name, p0), p1 in zip(fused.named_parameters(), plain.parameters()):
        assert_close(p0.grad, p1.grad, reduction=64 * 24 * 3, name=name)


def test_timm_parameter_names():
    block = TopKAttention(64, num_heads=2)
    assert set(block.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
