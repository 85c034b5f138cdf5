"""EmaTeacher (SPEC §2): owns the student->teacher pairing, the momentum schedule and resume state."""
from __future__ import annotations

import copy
import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from .dispatch import cuda_graph_capturing
from .ops.ema import EmaUpdate
from .schedules import cosine_schedule


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


class EmaTeacher:
    """A teacher kept as the exponential moving average of a student.

    * pairing by parameter name, computed once; ``exclude`` (glob patterns or a predicate on the
      name) drops student-only parts, e.g. SdAE's ``("decoder*", "mask_token")``;
    * the momentum: entry ``i`` of the official ``cosine_scheduler`` table of ``total_steps``
      entries from ``base_momentum`` toward ``final_momentum`` (optionally after a linear warm-up of
      ``warmup`` entries from ``warmup_start``, SdAE's ``--momentum_teacher_warmup_ep``), indexed by
      the iteration (``per="iteration"``, DINO) or by its epoch (``per="epoch"`` with
      ``steps_per_epoch``, SdAE);
    * the cadence, a separate thing: :meth:`step` (call it after every iteration) updates after
      every iteration (``cadence="iteration"``: DINO, SdAE's ``per_ite``) or only after the last
      iteration of every ``every``-th epoch (``cadence="epoch"``: SdAE's default ``per_epoch`` with
      ``--ema_frequent``). Both follow from the iteration counter alone, so a resumed run neither
      repeats nor skips an update;
    * ``copy_buffers`` copies the student's buffers (e.g. BatchNorm statistics) after each update;
    * ``state_dict()``/``load_state_dict()`` for resume.

    A DistributedDataParallel student is unwrapped (its module is paired). Under FSDP2 build the
    teacher with the same ``fully_shard`` layout and pass it in: the update pairs the local shards.

    Call :meth:`step` once after every iteration (:meth:`update` forces one update now).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, base_momentum: float = 0.996,
                 final_momentum: float = 1.0, total_steps: int = 1, per: str = "iteration",
                 steps_per_epoch: int | None = None, exclude: Iterable[str] | Callable[[str], bool] = (),
                 copy_buffers: bool = True, backend: str | None = None, cadence: str = "iteration",
                 every: int = 1, warmup: int = 0, warmup_start: float = 0.0):
        for name, value in (("per", per), ("cadence", cadence)):
            if value not in ("iteration", "epoch"):
                raise ValueError(f"{name} must be 'iteration' or 'epoch', got {value!r}")
        if (per == "epoch" or cadence == "epoch") and not steps_per_epoch:
            raise ValueError("per='epoch' or cadence='epoch' needs steps_per_epoch")
        if every < 1:
            raise ValueError(f"every must be >= 1 epoch, got {every}")
        if not 0 <= warmup <= total_steps:
            raise ValueError(f"warmup {warmup} must lie in [0, total_steps={total_steps}]")
        self.student = student
        student_module = unwrap(student)
        if teacher is None:
            teacher = copy.deepcopy(student_module)
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.base_momentum, self.final_momentum = base_momentum, final_momentum
        self.total_steps, self.per, self.steps_per_epoch = total_steps, per, steps_per_epoch
        self.cadence, self.every, self.warmup, self.warmup_start = cadence, every, warmup, warmup_start
        self.copy_buffers, self.backend = copy_buffers, backend
        self.iteration = 0
        if callable(exclude):
            self._keep = lambda name: not exclude(name)
        else:
            patterns = tuple(exclude)
            self._keep = lambda name: not any(fnmatch.fnmatch(name, p) for p in patterns)
        self.names, self._teacher_params, self._student_params = self._pair(student_module)
        self._buffer_pairs = self._pair_buffers(student_module) if copy_buffers else []
        self._update = None
        self.prepare()

    def prepare(self) -> "EmaTeacher":
        """Plan the update now, on the host (validation, backend choice, the fused backends' block
        tables): planning reads ``data_ptr()`` and may load the CUDA extension, which a traced step
        (``torch.compile``) cannot do, so it happens here, when the teacher is built, not in the
        first update. The pairs hold the parameters' storage as it is now: build the EmaTeacher
        after any ``.to(device)``."""
        if self._update is None:
            if torch.compiler.is_compiling():
                raise RuntimeError("EmaTeacher: the EMA update must be planned before torch.compile traces it; "
                                   "build the EmaTeacher (or call prepare()) outside the compiled function")
            self._update = EmaUpdate(self._teacher_params, self._student_params, backend=self.backend)
            # The schedule's every entry, float64 on the teacher's device: a traced step indexes it with
            # the (symbolic) iteration. A float momentum would be a constant of the graph, one graph
            # per value (DINO: per iteration) until Dynamo's recompile limit; the op takes this tensor
            # entry with no host sync, and updates exactly as the float would (SPEC §2).
            device = self._teacher_params[0].device if self._teacher_params else None
            self._table = torch.tensor([self._momentum_at(i) for i in range(self.total_steps)],
                                       dtype=torch.float64, device=device)
            # The iteration on the device, for CUDA-graph replays (see step); kept by eager steps.
            self._count = torch.tensor(self.iteration, dtype=torch.int64, device=device)
            # Eager steps on a GPU read the momentum off the table too (the same value): the kernels
            # a later CUDA-graph capture records are then those the eager warm-up steps compiled.
            self._momentum_on_device = self._table.is_cuda
        return self

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
        return self._momentum_at(it // self.steps_per_epoch if self.per == "epoch" else it)

    def _momentum_at(self, step: int) -> float:
        return cosine_schedule(step, self.base_momentum, self.final_momentum, self.total_steps, self.warmup,
                               self.warmup_start)

    def due(self, iteration: int | None = None) -> bool:
        """Whether the cadence updates the teacher after ``iteration`` (0-based)."""
        it = self.iteration if iteration is None else iteration
        if self.cadence == "iteration":
            return True
        done = it + 1  # iterations finished once this one is
        return done % self.steps_per_epoch == 0 and (done // self.steps_per_epoch) % self.every == 0

    @torch.no_grad()
    def _apply(self, m, due=None) -> None:
        self.prepare()._update(m)
        for t, s in self._buffer_pairs:
            t.copy_(s if due is None else torch.where(due, s, t))

    def step(self):
        """End of one iteration: update if the cadence says so (with the momentum of this iteration,
        i.e. of its epoch when ``per="epoch"``), then advance; returns the momentum used (under
        torch.compile its 0-dim tensor) or None.

        Inside a CUDA-graph capture and a torch.compile trace the iteration is the device counter,
        so each replay (each compiled call) takes its own momentum and cadence: :meth:`_step_on_device`."""
        if cuda_graph_capturing() or torch.compiler.is_compiling():
            return self._step_on_device(cadence=True)
        m = self._eager_momentum() if self.due() else None
        if m is not None:
            self._apply(m)
        self.iteration += 1
        return m

    def update(self) -> float:
        """One EMA update now with the scheduled momentum, whatever the cadence; advances the counter."""
        if cuda_graph_capturing() or torch.compiler.is_compiling():
            return self._step_on_device(cadence=False)
        m = self._eager_momentum()
        self._apply(m)
        self.iteration += 1
        return m

    def _eager_momentum(self):
        """This iteration's momentum: the float, or on a GPU its entry of the device table (0-dim
        float64: the same update bit for bit, SPEC §2; no sync)."""
        if self.prepare()._momentum_on_device:
            return self._table_entry(self._count)
        return self.momentum()

    def _table_entry(self, it: torch.Tensor) -> torch.Tensor:
        index = it // self.steps_per_epoch if self.per == "epoch" else it
        return entry(self._table, index.clamp(0, self.total_steps - 1))

    @property
    def iteration(self) -> int:
        return self._iteration

    @iteration.setter
    def iteration(self, value) -> None:
        # The device counter follows the host's (a host value into device memory: no sync), except
        # in a torch.compile trace (the iteration is a symbol there) and in a CUDA-graph capture
        # (where the counter advances in the graph, see _step_on_device).
        if torch.compiler.is_compiling():
            self._iteration = value
            return
        changed = getattr(self, "_iteration", None) != value
        self._iteration = value
        count = getattr(self, "_count", None)
        if changed and count is not None and not cuda_graph_capturing():
            count.fill_(value)

    @torch.no_grad()
    def _step_on_device(self, cadence: bool):
        """The step with everything the schedule decides computed on the device from ``_count``: the
        momentum (the table's entry) and, on an epoch cadence, whether to update (else momentum 1,
        t = 1·t + 0·s = t, and buffers kept); the counter advances in the graph. So a torch.compile
        graph holds no schedule value (a float momentum was a constant of it, one graph per value;
        SdAE's update and no-update epochs were two graphs), and a CUDA-graph replay takes its own
        schedule. In a capture the host's ``iteration`` advances at the capture only: a caller
        replaying the graph keeps its own."""
        it = self.prepare()._count
        m = self._table_entry(it)
        due = None
        if cadence and self.cadence == "epoch":
            done = it + 1
            due = (done % self.steps_per_epoch == 0) & ((done // self.steps_per_epoch) % self.every == 0)
            m = torch.where(due, m, torch.ones_like(m))
        self._apply(m, due)
        it += 1
        self._iteration += 1  # the host's count, at the capture only (no fill: the graph advances its own)
        return m

    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.teacher.load_state_dict(state["teacher"])


def entry(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 0-dim device index, as a gather: indexing with the tensor itself reads
    its value on the host (a sync, and data-dependent under torch.compile)."""
    return table.index_select(0, index.reshape(1)).reshape(())
