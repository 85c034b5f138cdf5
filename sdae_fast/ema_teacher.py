"""EmaTeacher (SPEC §2): owns the student->teacher pairing, the momentum schedule and resume state."""
from __future__ import annotations

import copy
import fnmatch
import math
from typing import Callable, Iterable

import torch
from torch import nn

from .ops.ema import EmaUpdate


_WRAPPERS = ("DistributedDataParallel", "DataParallel")


def unwrap(module: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel or DataParallel (matched by class name too, so
    subclasses and look-alike wrappers unwrap as well)."""
    while (isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel))
           or type(module).__name__ in _WRAPPERS) and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    return module


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor the update works on: a plain parameter's data, or an FSDP2 DTensor's local shard
    (teacher and student sharded alike, so local shards pair one to one)."""
    data = p.data
    to_local = getattr(data, "to_local", None)
    return to_local() if callable(to_local) else data


def cosine_momentum(step: int, total: int, base: float, final: float) -> float:
    """Cosine ramp from ``base`` at step 0 to ``final`` at ``total`` (DINO's ``cosine_scheduler``)."""
    if total <= 0:
        return final
    step = min(max(step, 0), total)
    return final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2


class EmaTeacher:
    """A teacher kept as the exponential moving average of a student.

    * pairing by parameter name, computed once; ``exclude`` (glob patterns or a predicate on the
      name) drops student-only parts, e.g. SdAE's ``("decoder*", "mask_token")``;
    * cosine momentum from ``base_momentum`` to ``final_momentum`` over ``total_steps``, stepped per
      iteration (DINO) or per epoch (SdAE: ``per="epoch"`` with ``steps_per_epoch``);
    * ``copy_buffers`` copies the student's buffers (e.g. BatchNorm statistics) after each update;
    * ``state_dict()``/``load_state_dict()`` for resume.

    A DistributedDataParallel student is unwrapped (its module is paired). Under FSDP2 build the
    teacher with the same ``fully_shard`` layout and pass it in: the update pairs the local shards.

    Call :meth:`update` once after every optimizer step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, total_steps: int = 1, per: str = "iteration",
                 steps_per_epoch: int | None = None, exclude: Iterable[str] | Callable[[str], bool] = (),
                 copy_buffers: bool = True, backend: str | None = None):
        if per not in ("iteration", "epoch"):
            raise ValueError(f"per must be 'iteration' or 'epoch', got {per!r}")
        if per == "epoch" and not steps_per_epoch:
            raise ValueError("per='epoch' needs steps_per_epoch")
        self.student = student
        student_module = unwrap(student)
        if teacher is None:
            teacher = copy.deepcopy(student_module)
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        self.total_steps, self.per, self.steps_per_epoch = total_steps, per, steps_per_epoch
        self.copy_buffers, self.backend = copy_buffers, backend
        self.iteration = 0
        if callable(exclude):
            self._keep = lambda name: not exclude(name)
        else:
            patterns = tuple(exclude)
            self._keep = lambda name: not any(fnmatch.fnmatch(name, p) for p in patterns)
        self.names, self._teacher_params, self._student_params = self._pair(student_module)
        self._buffer_pairs = self._pair_buffers(student_module) if copy_buffers else []
        self._update = None  # an EmaUpdate, planned at the first update (after any .to(device))

    def _pair(self, student_module: nn.Module):
        teacher_params = dict(self.teacher.named_parameters())
        student_params = dict(student_module.named_parameters())
        names = [n for n in teacher_params if self._keep(n)]
        missing = [n for n in names if n not in student_params]
        if missing:
            raise KeyError(f"teacher parameters without a student counterpart: {missing[:5]}")
        for n in names:
            if teacher_params[n].shape != student_params[n].shape:
                raise ValueError(f"{n}: teacher shape {tuple(teacher_params[n].shape)} != student "
                                 f"{tuple(student_params[n].shape)}")
        return names, [local_tensor(teacher_params[n]) for n in names], [local_tensor(student_params[n]) for n in names]

    def _pair_buffers(self, student_module: nn.Module):
        student_buffers = dict(student_module.named_buffers())
        return [(b, student_buffers[n]) for n, b in self.teacher.named_buffers()
                if self._keep(n) and n in student_buffers]

    def momentum(self, iteration: int | None = None) -> float:
        it = self.iteration if iteration is None else iteration
        step = it // self.steps_per_epoch if self.per == "epoch" else it
        return cosine_momentum(step, self.total_steps, self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update(self) -> float:
        """One EMA step with the scheduled momentum; returns the momentum used."""
        m = self.momentum()
        if self._update is None:
            self._update = EmaUpdate(self._teacher_params, self._student_params, backend=self.backend)
        self._update(m)
        for t, s in self._buffer_pairs:
            t.copy_(s)
        self.iteration += 1
        return m

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.teacher.load_state_dict(state["teacher"])
