"""Output allocation for kernel launchers.

Tests switch ``POISON`` on (or a user sets ``SDAE_FAST_POISON=1``) so every output a launcher
allocates starts as NaN (floats) or -1 (integers): a row a kernel never writes then fails the test
instead of passing on whatever memory happened to hold.
"""
import os

import torch

POISON = os.environ.get("SDAE_FAST_POISON", "0") == "1"
# Tests may set a function that returns the buffer an output lives in instead (same shape, dtype,
# device): tests/guard_pages.py places each one against an inaccessible page, so a kernel that
# writes or reads past an output's end faults in the interpreter instead of passing silently.
PLACE = None


def zeros(*shape, dtype, device) -> torch.Tensor:
    """A zero-filled launcher buffer (an atomic accumulator, a counter): never poisoned, placed
    like every output when a test sets ``PLACE``."""
    out = torch.zeros(*shape, dtype=dtype, device=device)
    return out if PLACE is None else PLACE(out)


def empty(*shape, dtype, device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if PLACE is not None:
        out = PLACE(out)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
