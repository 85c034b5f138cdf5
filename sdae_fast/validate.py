"""Input checks shared by every op, run before any backend: a clear error, never a device crash."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
) -> torch.Tensor:
    """``t`` is a tensor of rank ``ndim`` (an int or a choice of ints) and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def check_same_device(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        listing = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {listing}")


def check_same_dtype(**tensors) -> None:
    present = {k: v for k, v in tensors.items() if v is not None}
    dtypes = {v.dtype for v in present.values()}
    if len(dtypes) > 1:
        listing = ", ".join(f"{k}: {str(v.dtype).replace('torch.', '')}" for k, v in present.items())
        raise TypeError(f"tensors must share one dtype, got {listing}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int | None]) -> None:
    """``None`` in ``expected`` matches any size."""
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def check_index_range(name: str, index: torch.Tensor, upper: int, *, op: str = "sdae_fast") -> None:
    """Every value of ``index`` lies in [0, upper), else an IndexError naming ``op``, ``name`` and the
    range found. No host sync by default: the check is deferred to ``sdae_fast.check_errors()``
    (see :mod:`sdae_fast.checks`); ``SDAE_FAST_CHECKS=eager`` raises here instead."""
    from . import checks

    check = checks.register(op, IndexError, name + " values must lie in [0, {v2}), found range [{v0}, {v1}]")
    checks.index_in_range(check, index, upper)


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
