"""Output allocation for kernel launchers.

Tests switch ``POISON`` on (or a user sets ``SDAE_FAST_POISON=1``) so every output a launcher
allocates starts as NaN (floats) or -1 (integers): a row a kernel never writes then fails the test
instead of passing on whatever memory happened to hold.
"""
import os

import torch

POISON = os.environ.get("SDAE_FAST_POISON", "0") == "1"


def empty(*shape, dtype, device) -> torch.Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out
