"""The EMA-teacher half of SdAE and DINO: schedule, update after each step, exact resume.

A model using :class:`EmaTeacherMixin` registers its teacher as the submodule ``self.teacher``
whose parameter names equal the student's (the student is the model itself, so the teacher is an
``nn.ModuleDict`` of copies, e.g. ``{"encoder": ...}`` pairs ``teacher.encoder.*`` with
``encoder.*``). The teacher weights are thus in the model's ``state_dict``; the step counter and
the schedule travel as the model's extra state (``_extra_state``), so ``load_state_dict`` resumes
the momentum schedule exactly.

Every teacher parameter is paired, frozen student tensors included: SdAE's official
``weight_delivery`` averages the teacher's learnable pos_embed toward the student's fixed sin-cos
table, and DINO's update zips all parameters (its frozen unit ``weight_g`` with the teacher's).

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

    def _init_ema(self, *, base_momentum: float, final_momentum: float, per: str, cadence: str = "iteration",
                  every: int = 1, warmup_epochs: int = 0, warmup_start: float = 0.0):
        """``per``: the momentum's unit ("iteration" or "epoch"); ``cadence``: when updates happen
        ("iteration" or "epoch", the latter every ``every`` epochs); ``warmup_epochs`` /
        ``warmup_start``: a linear momentum warm-up (in ``per`` units: SdAE's is per epoch)."""
        self.ema_base, self.ema_final, self.ema_per = base_momentum, final_momentum, per
        self.ema_cadence, self.ema_every = cadence, every
        self.ema_warmup, self.ema_warmup_start = warmup_epochs, warmup_start
        self.total_steps, self.steps_per_epoch, self.step = 1, 1, 0
        self._ema = None
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def _ema_teacher(self) -> EmaTeacher:
        if self._ema is None:
            epochs = -(-self.total_steps // self.steps_per_epoch)  # a last partial epoch counts
            total = self.total_steps if self.ema_per == "iteration" else epochs
            # student=self: pairs teacher.X.* with X.* by name (ema_teacher.EmaTeacher._pair), all of them.
            self._ema = EmaTeacher(self, self.teacher, base_momentum=self.ema_base, final_momentum=self.ema_final,
                                   total_steps=total, per=self.ema_per, steps_per_epoch=self.steps_per_epoch,
                                   cadence=self.ema_cadence, every=self.ema_every,
                                   warmup=min(self.ema_warmup, total), warmup_start=self.ema_warmup_start,
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
        """End of one training iteration: EMA-update the teacher if the cadence says so, advance."""
        self._ema_teacher().step()
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

    def __getstate__(self):
        # copy.deepcopy / pickle: the EmaTeacher's pairs are views of *these* parameters, and a copy
        # of them would be tensors of their own, which the copy's updates would move instead of its
        # teacher (silently). The copy rebuilds its own from its parameters, at the same step.
        state = dict(super().__getstate__())
        state["_ema"] = None
        return state

    teacher_train_mode = False  # DINO with BatchNorm in its head: the official teacher runs in train mode

    def train(self, mode: bool = True):
        super().train(mode)
        # The teacher has no drop_path (rate 0, as built officially) and never drops tokens: eval
        # is the same computation, and it keeps any BatchNorm on its running statistics unless
        # the method asks for the official train-mode teacher.
        self.teacher.train(mode and self.teacher_train_mode)
        return self

