"""The fused EMA over pairs that callers hand in anew on every step (as the APIs we mirror do).

The official loops look their tensors up on every call, so a module moved by ``.to()`` or a buffer
reassigned between steps is still paired right. :class:`PlannedEma` keeps that: it takes the
tensor lists each call, but plans the fused update (validation, backend choice, block tables) only
when some tensor's storage changed since the last call. The plan holds the old tensors, so their
storage cannot be reused under the same address while it is cached.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.ema import EmaUpdate


def storage_key(tensors) -> tuple:
    return tuple((t.data_ptr(), t.dtype) for t in tensors)


class PlannedEma:
    """``t <- m·t + (1 - m)·s`` over the floating pairs; with ``copy_other`` the non-floating pairs
    (integer buffers such as BatchNorm's ``num_batches_tracked``) are copied, as timm does."""

    def __init__(self, *, copy_other: bool = False, backend: str | None = None):
        self.copy_other, self.backend = copy_other, backend
        self._key = None

    def _plan(self, teacher, student):
        floats = [i for i, t in enumerate(teacher) if t.is_floating_point()]
        others = [i for i, t in enumerate(teacher) if not t.is_floating_point()]
        if others and not self.copy_other:
            raise TypeError(f"EMA over non-floating tensors (pairs {others[:5]}) is undefined")
        self._update = EmaUpdate([teacher[i] for i in floats], [student[i] for i in floats], backend=self.backend)
        self._copy_t = [teacher[i].data for i in others]
        self._copy_s = [student[i].data for i in others]
        self._key = storage_key(teacher) + storage_key(student)

    @torch.no_grad()
    def __call__(self, teacher: list[torch.Tensor], student: list[torch.Tensor], momentum) -> None:
        if len(teacher) != len(student):
            raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
        if self._key != storage_key(teacher) + storage_key(student):
            self._plan(teacher, student)
        self._update(momentum)
        if self._copy_t:
            torch._foreach_copy_(self._copy_t, self._copy_s)


def module_fingerprint(*modules: nn.Module) -> tuple:
    """The identities of every submodule: a cached pairing of (owner, attribute) slots stays valid
    while this is unchanged (a replaced submodule, e.g. by ``convert_sync_batchnorm`` or
    ``reset_classifier``, changes it; a rebound parameter is read anew through its slot anyway)."""
    return tuple(id(m) for module in modules for m in module.modules())


def state_slots(module: nn.Module, *, params_only: bool = False) -> list[tuple[nn.Module, str]]:
    """(owner module, attribute) of every ``state_dict`` entry, in ``state_dict`` order, so each
    step reads the current tensors with ``getattr`` instead of rebuilding the state_dict."""
    if params_only:
        names = [n for n, _ in module.named_parameters()]
    else:  # extra state (non-tensor entries) is not averaged
        names = [n for n, v in module.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)]
    slots = []
    for name in names:
        owner, _, attr = name.rpartition(".")
        slots.append((module.get_submodule(owner) if owner else module, attr))
    return slots


def read_slots(slots) -> list[torch.Tensor]:
    return [getattr(owner, attr) for owner, attr in slots]
