"""``DINOLoss``: facebookresearch/dino ``main_dino.DINOLoss`` on the fused ``dino_loss``.

Same constructor, same ``forward(student_output, teacher_output, epoch)``, same ``center`` buffer
(shape (1, out_dim), so ``dino_loss.state_dict()`` checkpoints load both ways) and the same
per-epoch teacher-temperature schedule (``teacher_temp_schedule``, a numpy array: linear warm-up
from ``warmup_teacher_temp`` over ``warmup_teacher_temp_epochs`` epochs, then ``teacher_temp``).

The student output is cut into ``ncrops`` chunks and the teacher output into 2 (the global
crops), as the official loss does; the loss is the mean over the pairs of a teacher chunk and a
different student chunk. After the loss the centre moves towards the mean teacher row, averaged
over all processes when torch.distributed is initialised (the official code requires it to be).
The centre is updated in place, so references to the buffer stay valid (the official code
rebinds it); the fused kernel never forms the softmaxes of width out_dim.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..ops.dino_loss import dino_loss, update_center_


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
                 warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
                 center_momentum: float = 0.9, *, backend: str | None = None):
        super().__init__()
        self.student_temp, self.center_momentum, self.ncrops, self.backend = student_temp, center_momentum, ncrops, backend
        self.register_buffer("center", torch.zeros(1, out_dim))
        # Warm-up of the teacher temperature: too sharp a teacher early makes training unstable.
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor, epoch: int) -> torch.Tensor:
        """Cross-entropy between the sharpened, centred teacher softmax and the student log-softmax."""
        if teacher_output.dim() != 2 or teacher_output.shape[0] % 2:
            raise ValueError(f"DINOLoss: teacher_output must be (2·B, out_dim) for the 2 global crops, "
                             f"got shape {tuple(teacher_output.shape)}")
        batch = teacher_output.shape[0] // 2
        if student_output.dim() != 2 or student_output.shape[0] != self.ncrops * batch:
            raise ValueError(f"DINOLoss: student_output must be (ncrops·B, out_dim) = ({self.ncrops}·{batch}, ...), "
                             f"got shape {tuple(student_output.shape)}")
        temp = float(self.teacher_temp_schedule[epoch])
        return dino_loss(student_output, teacher_output.detach(), self.center, student_temp=self.student_temp,
                         teacher_temp=temp, num_global=2, center_momentum=self.center_momentum,
                         update_center=True, backend=self.backend)

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """The official method, kept for callers that use it on its own."""
        update_center_(self.center, teacher_output, self.center_momentum)
