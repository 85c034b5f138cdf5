"""``update_momentum(model, model_ema, m)``: lightly's ``lightly.models.utils.update_momentum``, fused.

lightly pairs ``model_ema.parameters()`` with ``model.parameters()`` by order (``zip``: the shorter
list ends the pairing) and sets ``ema = ema·m + param·(1 - m)``. Here the same pairs go through one
fused multi-tensor update, planned once per (model, model_ema) and replanned when their storage
moves. Unlike lightly, the EMA tensors are updated in place (their ``.data`` is not replaced), so
references to them — an optimizer's, a compiled graph's — stay valid.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from .planned_ema import PlannedEma

# model_ema -> {id(model): (weakref(model), plan)}; entries die with the EMA module.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _plan_for(model: nn.Module, model_ema: nn.Module, backend) -> PlannedEma:
    plans = _PLANS.setdefault(model_ema, {})
    ref, plan = plans.get(id(model), (None, None))
    if plan is None or ref() is not model or plan.backend != backend:
        plan = PlannedEma(backend=backend)
        plans[id(model)] = (weakref.ref(model), plan)
    return plan


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float, *, backend: str | None = None) -> None:
    """Updates ``model_ema``'s parameters with the exponential moving average of ``model``'s.

    ``m`` is the momentum (close to 1, e.g. 0.999): ``ema <- m·ema + (1 - m)·param``.
    """
    ema_params, params = list(model_ema.parameters()), list(model.parameters())
    n = min(len(ema_params), len(params))
    _plan_for(model, model_ema, backend)(ema_params[:n], params[:n], m)
