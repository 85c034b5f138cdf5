"""The EMA-teacher half of SdAE and DINO: schedule, update after each step, exact resume.

A model using :class:`EmaTeacherMixin` registers its teacher as the submodule ``self.teacher``
whose parameter names equal the student's (the student is the model itself, so the teacher is an
``nn.ModuleDict`` of copies, e.g. ``{"encoder": ...}`` pairs ``teacher.encoder.*`` with
``encoder.*``). The teacher weights are thus in the model's ``state_dict``; the step counter and
the schedule travel as the model's extra state (``_extra_state``), so ``load_state_dict`` resumes
the momentum schedule exactly.

The :class:`~sdae_fast.ema_teacher.EmaTeacher` doing the update holds references to the
parameters' storage, so it is (re)built lazily: after ``.to()``/``.cuda()``/``.half()`` and after a
backend change.
"""
from __future__ import annotations

from torch import nn

from ..ema_teacher import EmaTeacher


class EmaTeacherMixin:
    teacher: nn.Module
    backend: str | None

    def _init_ema(self, *, base_momentum: float, final_momentum: float, per: str):
        self.ema_base, self.ema_final, self.ema_per = base_momentum, final_momentum, per
        self.total_steps, self.steps_per_epoch, self.step = 1, 1, 0
        self._ema = None
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _ema_teacher(self) -> EmaTeacher:
        if self._ema is None:
            total = self.total_steps if self.ema_per == "iteration" else max(self.total_steps // self.steps_per_epoch, 1)
            # student=self: pairs teacher.X.* with X.* by name (ema_teacher.EmaTeacher._pair). Frozen
            # student tensors (fixed sincos tables, DINO's unit weight_g) are equal in both: skipped.
            frozen = {n for n, p in self.named_parameters() if not p.requires_grad}
            self._ema = EmaTeacher(self, self.teacher, base_momentum=self.ema_base, final_momentum=self.ema_final,
                                   total_steps=total, per=self.ema_per, steps_per_epoch=self.steps_per_epoch,
                                   exclude=lambda n: n in frozen,
                                   copy_buffers=False, backend=self.backend)
        self._ema.iteration = self.step
        return self._ema

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """Momentum ramps over ``total_steps`` iterations (or their epochs when stepped per epoch)."""
        if total_steps < 1 or steps_per_epoch < 1:
            raise ValueError(f"total_steps and steps_per_epoch must be >= 1, got {total_steps}, {steps_per_epoch}")
        self.total_steps, self.steps_per_epoch, self._ema = int(total_steps), int(steps_per_epoch), None

    def momentum(self) -> float:
        """The momentum the next :meth:`after_step` will use."""
        return self._ema_teacher().momentum()

    def after_step(self) -> None:
        """EMA-update the teacher from the student just stepped, then advance the schedule."""
        self._ema_teacher().update()
        self.step += 1

    # --- state ------------------------------------------------------------------------------
    def get_extra_state(self):
        return {"step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch}

    def set_extra_state(self, state) -> None:
        self.step, self.total_steps, self.steps_per_epoch = state["step"], state["total_steps"], state["steps_per_epoch"]
        self._ema = None

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._ema = None  # parameter storage may have moved
        return out

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never drops paths or tokens
        return self

