"""SdAE's teacher EMA (AbrahamYabo/SdAE ``engine_pretrain.EMA_process`` / ``weight_delivery``), fused.

The official ``EMA_process`` deep-copies the teacher, loads the student's weights into the copy
through ``weight_delivery`` (a renaming of the student's state_dict: ``backbone.`` and
``encoder.`` prefixes dropped, the decoder, ``encoder_to_decoder``, ``mask_token`` and
``encoder.norm`` left out) and then averages the teacher's parameters with the copy's, one tensor
at a time. The result is ``t <- m·t + (1 - m)·s`` for every teacher parameter ``t`` and the
student tensor ``s`` that ``weight_delivery`` delivers under ``t``'s name — frozen ones included
(the teacher's learnable pos_embed moves towards the student's fixed sin-cos table).

:class:`TeacherEma` computes that pairing once (checking, as the official strict
``load_state_dict`` does, that the delivered keys are exactly the teacher's) and runs one fused
multi-tensor update per call; no copy of the teacher is made. :func:`EMA_process` has the official
signature and keeps one :class:`TeacherEma` per teacher.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
from torch import nn

from ..ema_teacher import unwrap
from .planned_ema import PlannedEma, module_fingerprint, read_slots, state_slots


def delivered_name(key: str) -> str | None:
    """The teacher key ``weight_delivery`` gives the student entry ``key`` (None: left out)."""
    if key.startswith("backbone."):
        return key[len("backbone."):]
    if key.startswith("encoder.") and "norm." not in key:
        return key[len("encoder."):]
    if key.startswith(("decoder", "encoder_to_decoder.", "mask_token", "encoder.norm")):
        return None
    return key


def weight_delivery(model: nn.Module, epoch=None, momentum_schedule=None) -> "OrderedDict[str, torch.Tensor]":
    """The official function's result: the student's state_dict under the teacher's names.
    (``epoch`` and ``momentum_schedule`` are accepted for the official signature and unused, as there.)"""
    state = unwrap(model).state_dict()
    return OrderedDict((name, state[key]) for key in state if (name := delivered_name(key)) is not None)


class TeacherEma:
    """``teacher <- m·teacher + (1 - m)·delivered student``, fused over a pairing made once."""

    def __init__(self, model: nn.Module, teacher: nn.Module, *, backend: str | None = None):
        student = unwrap(model)
        sources = {}
        for key, value in student.state_dict(keep_vars=True).items():
            name = delivered_name(key)
            if name is not None and isinstance(value, torch.Tensor):
                owner, _, attr = key.rpartition(".")
                sources[name] = (student.get_submodule(owner) if owner else student, attr)
        wanted = [k for k, v in teacher.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)]
        missing = sorted(set(wanted) - set(sources))
        unexpected = sorted(set(sources) - set(wanted))
        if missing or unexpected:
            raise KeyError(f"weight_delivery does not match the teacher's state_dict: missing {missing[:8]}, "
                           f"unexpected {unexpected[:8]} (the official load_state_dict would fail too)")
        names = [n for n, _ in teacher.named_parameters()]
        self.teacher_slots = state_slots(teacher, params_only=True)  # the official zip: teacher.parameters()
        self.student_slots = [sources[n] for n in names]
        self._ema = PlannedEma(backend=backend)

    def __call__(self, momentum) -> None:
        self._ema(read_slots(self.teacher_slots), read_slots(self.student_slots), momentum)


_TEACHERS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def EMA_process(model, model_teacher, model_teacher_without_ddp, epoch, momentum_schedule, *,  # noqa: N802
                backend: str | None = None) -> None:
    """The official signature: EMA-update ``model_teacher_without_ddp`` from ``model`` with
    momentum ``momentum_schedule[epoch]``. ``model_teacher`` is unused, as in the official code."""
    ref, key, ema = _TEACHERS.get(model_teacher_without_ddp, (None, None, None))
    now = module_fingerprint(unwrap(model), model_teacher_without_ddp)  # a replaced submodule re-pairs
    if ema is None or ref() is not unwrap(model) or key != now:
        ema = TeacherEma(model, model_teacher_without_ddp, backend=backend)
        _TEACHERS[model_teacher_without_ddp] = (weakref.ref(unwrap(model)), now, ema)
    ema(float(momentum_schedule[epoch]))
