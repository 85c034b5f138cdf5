"""Schedules shared by the optimiser (DINO's lr and weight decay) and the EMA teachers (momentum)."""
from __future__ import annotations

import math


def cosine_schedule(i: int, base: float, final: float, total: int, warmup: int = 0, warmup_start: float = 0.0) -> float:
    """Entry ``i`` of DINO's ``utils.cosine_scheduler`` table (SdAE's ``util/cosine_scheduler.py`` is
    the same function) of ``total`` entries: ``np.linspace(warmup_start, base, warmup)`` for the
    first ``warmup`` entries, then ``final + ½(base − final)(1 + cos(π j / (total − warmup)))`` for
    j = 0 .. total − warmup − 1 (the final value itself is never reached). Past the end: the last entry."""
    if total < 1:
        raise ValueError(f"cosine_schedule needs total >= 1 entries, got {total}")
    if not 0 <= warmup <= total:
        raise ValueError(f"cosine_schedule: warmup {warmup} must lie in [0, total={total}]")
    i = min(max(int(i), 0), total - 1)
    if i < warmup:
        if warmup == 1:
            return float(warmup_start)  # np.linspace(start, stop, 1) is [start]
        if i == warmup - 1:
            return float(base)  # linspace ends exactly on its stop value
        return warmup_start + i * ((base - warmup_start) / (warmup - 1))
    span = total - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (i - warmup) / span))
