"""compat.dino.DINOLoss against a float64 re-implementation of main_dino.DINOLoss (facebookresearch/dino,
in sdae_fast.bench.official)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdae_fast.bench.official import OfficialDINOLoss
from sdae_fast.compat.dino import DINOLoss
from sdae_fast.testing import assert_close


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("ncrops,batch,out_dim", [(4, 3, 33), (2, 2, 64), (5, 1, 17)])
def test_dino_loss_matches_official(backend, ncrops, batch, out_dim):
    args = (out_dim, ncrops, 0.04, 0.07, 3, 5)
    ours, ref = DINOLoss(*args, student_temp=0.1, center_momentum=0.9, backend=backend), OfficialDINOLoss(*args)
    assert np.allclose(ours.teacher_temp_schedule, ref.schedule, rtol=0, atol=1e-15)
    assert ours.state_dict()["center"].shape == (1, out_dim)
    for epoch in (0, 1, 4):  # warm-up and after
        student = torch.randn(ncrops * batch, out_dim, requires_grad=True)
        teacher = torch.randn(2 * batch, out_dim)
        s64 = student.detach().double().requires_grad_()
        loss_ref = ref(s64, teacher.double(), epoch)
        loss_ref.backward()
        center_before = ours.center
        loss = ours(student, teacher, epoch)
        loss.backward()
        assert loss.dtype == torch.float32
        assert_close(loss, loss_ref, dtype=torch.float32, reduction=out_dim, name=f"loss epoch {epoch}")
        assert_close(student.grad, s64.grad, dtype=torch.float32, reduction=out_dim, name="d loss / d student")
        assert ours.center is center_before  # updated in place
        assert_close(ours.center, ref.center, dtype=torch.float32, reduction=2 * batch, name="center")


def test_dino_loss_rejects_mismatched_crops():
    loss = DINOLoss(8, 4, 0.04, 0.04, 0, 2)
    with pytest.raises(ValueError, match="ncrops"):
        loss(torch.randn(6, 8), torch.randn(4, 8), 0)
