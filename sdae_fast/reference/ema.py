"""EMA teacher update (SPEC §2)."""
import torch

from .stats import accumulation_dtype


@torch.no_grad()
def ema_update_(teacher, student, momentum) -> None:
    """``t <- m·t + (1 - m)·s`` for every pair, in fp32, rounded once to t's dtype, in place.

    ``teacher``/``student``: equal-length sequences of tensors. ``momentum``: float or 0-dim tensor.
    This is DINO's per-parameter loop, one pair at a time.
    """
    for t, s in zip(teacher, student):
        acc = accumulation_dtype(t, s)
        m = momentum.to(acc) if isinstance(momentum, torch.Tensor) else float(momentum)
        t.copy_((m * t.to(acc) + (1.0 - m) * s.to(acc)).to(t.dtype))
