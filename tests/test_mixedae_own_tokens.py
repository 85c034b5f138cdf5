"""MixedAE's per-source token gather: the group's cls copied apart, the patches gathered without a
repeated index, equal (forward and gradient) to gathering ``[0, 1 + ids_keep]`` per source."""
import pytest
import torch

from sdae_fast.models.mixedae import own_tokens
from sdae_fast.ops.masking import gather_tokens
from sdae_fast.testing import assert_close, triton_device

DEVICE = triton_device()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("groups,r,length,dim", [(2, 4, 16, 8), (3, 2, 10, 5)])
def test_own_tokens_match_the_repeated_cls_gather(backend, groups, r, length, dim):
    latent = torch.randn(groups, 1 + length, dim, device=DEVICE)  # gather_tokens takes no float64
    ids_keep = torch.stack([torch.randperm(length) for _ in range(groups)]).reshape(groups * r, length // r)
    ids_keep = ids_keep.to(DEVICE)
    grad = torch.randn(groups * r, 1 + length // r, dim, device=DEVICE, dtype=latent.dtype)

    ours = latent.clone().requires_grad_()
    out = own_tokens(ours, ids_keep, r, backend=backend)
    out.backward(grad)

    ref = latent.clone().requires_grad_()
    cls_and_own = torch.cat([ids_keep.new_zeros(groups * r, 1), ids_keep + 1], dim=1)
    want = gather_tokens(ref, cls_and_own, groups=r, backend="torch")
    want.backward(grad)
    assert_close(out, want, dtype=latent.dtype, name="own tokens")
    assert_close(ours.grad, ref.grad, dtype=latent.dtype, reduction=r, name="d latent")
