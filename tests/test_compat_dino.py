"""compat.dino.DINOLoss against a float64 re-implementation of main_dino.DINOLoss (facebookresearch/dino)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sdae_fast.compat.dino import DINOLoss
from sdae_fast.testing import assert_close


class OfficialDINOLoss:
    """main_dino.DINOLoss semantics, float64, single process (world size 1)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9):
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.center = torch.zeros(1, out_dim, dtype=torch.float64)
        warm = [warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * i / max(warmup_teacher_temp_epochs - 1, 1)
                for i in range(warmup_teacher_temp_epochs)]
        if warmup_teacher_temp_epochs == 1:
            warm = [warmup_teacher_temp]  # numpy.linspace with one point gives the start
        self.schedule = warm + [teacher_temp] * (nepochs - warmup_teacher_temp_epochs)

    def __call__(self, student_output, teacher_output, epoch):
        student = (student_output / self.student_temp).chunk(self.ncrops)
        teacher = torch.softmax((teacher_output - self.center) / self.schedule[epoch], dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v != iq:
                    total = total + torch.sum(-q * torch.log_softmax(s, dim=-1), dim=-1).mean()
                    terms += 1
        total = total / terms
        batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total


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
