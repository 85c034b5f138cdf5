"""Schedules shared by the optimiser (DINO's lr and weight decay) and the EMA teachers (momentum)."""
from __future__ import annotations

import math


def linspace_at(i: int, start: float, stop: float, n: int) -> float:
    """Entry ``i`` (0 <= i < n) of ``np.linspace(start, stop, n)``: both ends included, and [start]
    alone when n == 1 (the official warm-ups, DINO's teacher temperature, are such tables)."""
    if n == 1 or i == 0:
        return float(start)
    if i == n - 1:
        return float(stop)  # linspace ends exactly on its stop value
    return start + i * ((stop - start) / (n - 1))


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
        return linspace_at(i, warmup_start, base, warmup)
    span = total - warmup
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * (i - warmup) / span))
