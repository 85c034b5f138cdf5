"""The fused losses' backward allocates one tensor of the input's size, the scaled gradient: the
forward already wrote d loss / d input, so nothing else of that size may appear. The grad and
factor outputs of a kernel op take no gradient; autograd used to fill a zero tensor of the input's
size for the unused one at every backward (set_materialize_grads). Counted on the CPU with a
dispatch mode that sees every allocation of the backward."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdae_fast
from sdae_fast.testing import triton_device

DEVICE = triton_device()


class FullSizeAllocations(TorchDispatchMode):
    """The ops whose outputs have new storage of at least ``numel`` elements."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(o, torch.Tensor) and o.numel() >= self.numel
                    and o.untyped_storage().data_ptr() not in inputs):
                self.ops.append(str(func))
        return out


def rand(*shape):
    return torch.randn(*shape, device=DEVICE)


CASES = {
    "cosine_loss": ((8, 10, 64), lambda p: sdae_fast.cosine_loss(p, rand(8, 10, 64), backend="triton")),
    "masked_mse_loss": ((8, 10, 64), lambda p: sdae_fast.masked_mse_loss(p, rand(8, 10, 64), torch.ones(8, 10, device=DEVICE),
                                                                        backend="triton")),
    "dino_loss": ((12 * 8, 1000), lambda s: sdae_fast.dino_loss(s, rand(16, 1000), torch.zeros(1000, device=DEVICE),
                                                                update_center=False, backend="triton")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_backward_allocates_only_the_gradient(name):
    shape, loss_of = CASES[name]
    x = rand(*shape).requires_grad_()
    loss = loss_of(x)
    mode = FullSizeAllocations(x.numel())
    with mode:
        loss.backward()
    assert mode.ops == ["aten.mul.Tensor"], f"{name}: full-size allocations in the backward: {mode.ops}"
