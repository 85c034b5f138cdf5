"""EMA teacher update (SPEC §2)."""
import torch

from .stats import accumulation_dtype


@torch.no_grad()
def ema_update_(teacher, student, momentum) -> None:
    """``t <- m·t + (1 - m)·s`` for every pair, in fp32, rounded once to t's dtype, in place.

    ``teacher``/``student``: equal-length sequences of tensors. ``momentum``: float or 0-dim tensor.
    This is DINO's per-parameter loop, one pair at a time. ``1 - m`` is formed in float64, then
    rounded (a Python float's is; so a float64 momentum tensor updates exactly as its float would).
    """
    for t, s in zip(teacher, student):
        acc = accumulation_dtype(t, s)
        if isinstance(momentum, torch.Tensor):
            m, one_minus_m = momentum.to(acc), (1.0 - momentum.to(torch.float64)).to(acc)
        else:
            m = float(momentum)
            one_minus_m = 1.0 - m
        t.copy_((m * t.to(acc) + one_minus_m * s.to(acc)).to(t.dtype))
