"""``ModelEmaV3``: timm's ``timm.utils.ModelEmaV3`` (timm 1.0) on the fused multi-tensor EMA.

The same constructor, ``get_decay(step)``, ``update(model, step=None)``, ``set(model)``,
``.module`` and ``state_dict`` (keys ``module.*``): a checkpoint of one loads into the other.
``update`` pairs the EMA copy's state_dict entries with the model's by order, as timm does:
floating entries are averaged (``ema <- decay·ema + (1 - decay)·model``, timm's
``lerp(ema, model, 1 - decay)``) in one fused launch per dtype pair, the others are copied; with
``exclude_buffers`` only the parameters are averaged and every buffer is copied.

Differences, all on purpose: ``foreach`` is accepted and ignored (the update is always fused);
a bfloat16 EMA with timm's default ``stochastic_rounding=True`` is refused (the fused update
rounds to nearest: pass ``stochastic_rounding=False``, or ``dtype=torch.float32`` as timm advises).
This module does not import timm.
"""
from __future__ import annotations

import weakref
from copy import deepcopy
from typing import Optional

import torch
from torch import nn

from .planned_ema import PlannedEma, module_fingerprint, read_slots, state_slots


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """timm's copy of unaveraged entries, ``zip`` semantics; across devices when the EMA lives elsewhere."""
    n = min(len(dst), len(src))
    if n:
        torch._foreach_copy_(dst[:n], [s.to(device=dst[0].device) for s in src[:n]])


class ModelEmaV3(nn.Module):
    """An exponential moving average of everything in ``model``'s state_dict (or its parameters)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, min_decay: float = 0.0, update_after_step: int = 0,
                 use_warmup: bool = False, warmup_gamma: float = 1.0, warmup_power: float = 2 / 3,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                 stochastic_rounding: bool = True, stochastic_rounding_seed: int = 0, foreach: bool = True,
                 exclude_buffers: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.module = deepcopy(model)
        self.module.eval()
        self.decay, self.min_decay, self.update_after_step = decay, min_decay, update_after_step
        self.use_warmup, self.warmup_gamma, self.warmup_power = use_warmup, warmup_gamma, warmup_power
        self.device, self.dtype, self.foreach, self.exclude_buffers = device, dtype, foreach, exclude_buffers
        self.stochastic_rounding, self.stochastic_rounding_seed = stochastic_rounding, stochastic_rounding_seed
        if device is not None and device != next(model.parameters()).device:
            self.module.to(device=device)
        if dtype is not None:
            self.module.to(dtype=dtype)
        if stochastic_rounding and any(v.dtype == torch.bfloat16 for v in self.module.state_dict().values()
                                       if isinstance(v, torch.Tensor)):
            raise NotImplementedError("ModelEmaV3: the fused EMA rounds a bfloat16 EMA to nearest, not stochastically; "
                                      "pass stochastic_rounding=False or dtype=torch.float32")
        self._avg = PlannedEma(copy_other=True, backend=backend)
        self._slots = None

    def get_decay(self, step: Optional[int] = None) -> float:
        """timm's schedule: ``decay`` without a step; 0 for the first ``update_after_step + 1`` steps;
        with ``use_warmup``, ``1 - (1 + s / warmup_gamma) ** -warmup_power`` clamped to
        [min_decay, decay], s = step - update_after_step - 1."""
        if step is None:
            return self.decay
        step = max(0, step - self.update_after_step - 1)
        if step <= 0:
            return 0.0
        if not self.use_warmup:
            return self.decay
        decay = 1 - (1 + step / self.warmup_gamma) ** -self.warmup_power
        return max(min(decay, self.decay), self.min_decay)

    def _pairs(self, model: nn.Module, params_only: bool):
        key = (params_only, module_fingerprint(self.module, model))
        if self._slots is None or self._slots[0][0]() is not model or self._slots[0][1] != key:
            self._slots = ((weakref.ref(model), key), state_slots(self.module, params_only=params_only),
                           state_slots(model, params_only=params_only), None)
        _, ema_slots, model_slots, staging = self._slots
        ema, src = read_slots(ema_slots), read_slots(model_slots)
        if src and src[0].device != ema[0].device:
            # EMA kept on another device (timm's device=): stage the model there in buffers that
            # keep their storage, so the fused update stays planned.
            if staging is None or [t.shape for t in staging] != [t.shape for t in src]:
                staging = [torch.empty(t.shape, dtype=t.dtype, device=ema[0].device) for t in src]
                self._slots = self._slots[:3] + (staging,)
            for d, t in zip(staging, src):
                d.copy_(t.detach())
            src = staging
        return ema, src

    @torch.no_grad()
    def update(self, model: nn.Module, step: Optional[int] = None) -> None:
        decay = self.get_decay(step)
        ema, src = self._pairs(model, params_only=self.exclude_buffers)
        self._avg(ema, src, decay)
        if self.exclude_buffers:
            _copy(list(self.module.buffers()), list(model.buffers()))

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Copy ``model``'s state into the EMA."""
        _copy(list(self.module.state_dict().values()), list(model.state_dict().values()))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getstate__(self):
        # The cached pairing points into the trained model: a copy or a pickle plans afresh.
        state = self.__dict__.copy()
        state["_slots"], state["_avg"] = None, PlannedEma(copy_other=True, backend=self._avg.backend)
        return state
