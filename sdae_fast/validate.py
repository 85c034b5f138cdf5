"""Input checks shared by every op, run before any backend: a clear error, never a device crash."""
from __future__ import annotations

import functools
import math
import numbers
from typing import Iterable, Sequence

import torch

# What the fused (Triton, CUDA) kernels compute with; float64 is accepted by every public op too,
# but only the torch reference serves it (see dispatch.fused_dtype_why_not): it exists for
# fidelity checks against the official code in float64, not for speed.
FUSED_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = FUSED_FLOAT_DTYPES + (torch.float64,)
INDEX_DTYPES = (torch.int32, torch.int64)
_ARGUMENT_ERRORS = (TypeError, ValueError, IndexError)


def names_its_errors(op_name: str):
    """Decorator of a public op: the TypeError, ValueError or IndexError its checks raise starts with
    the op's name (``gather_tokens: index must have dtype ...``), as the deferred value checks' do."""
    prefix = f"{op_name}: "

    def wrap(fn):
        @functools.wraps(fn)
        def public_op(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except _ARGUMENT_ERRORS as exc:
                if type(exc) in _ARGUMENT_ERRORS and exc.args and isinstance(exc.args[0], str) \
                        and not exc.args[0].startswith(prefix):
                    exc.args = (prefix + exc.args[0],) + exc.args[1:]  # same exception, same traceback
                raise

        return public_op

    return wrap


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


def index_range_check(op: str, name: str):
    """The value check of :func:`check_index_range` for ``op``'s argument ``name``. Ops register theirs
    at import: registered inside a torch.compile trace, it would change the table of checks the
    first graph guards on, and that graph would never run again (one more compile)."""
    from . import checks

    return checks.register(op, IndexError, name + " values must lie in [0, {v2}), found range [{v0}, {v1}]")


def check_index_range(name: str, index: torch.Tensor, upper: int, *, op: str = "sdae_fast") -> None:
    """Every value of ``index`` lies in [0, upper), else an IndexError naming ``op``, ``name`` and the
    range found. No host sync by default: the check is deferred to ``sdae_fast.check_errors()``
    (see :mod:`sdae_fast.checks`); ``SDAE_FAST_CHECKS=eager`` raises here instead."""
    from . import checks

    checks.index_in_range(index_range_check(op, name), index, upper)


def check_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(t.stride())}")


def check_positive(name: str, value) -> float:
    return check_float(name, value, gt=0.0)


# --------------------------------------------------------------------------------------------
# Python scalars. A bool is an int to Python but never a count or an axis here (True would pass as
# 1 on one backend and fail deep inside another); a str is never a number, even "0.5".
# --------------------------------------------------------------------------------------------
def _type_name(value) -> str:
    return "a meta tensor" if isinstance(value, torch.Tensor) and value.is_meta else type(value).__name__


def check_int(name: str, value, *, ge: int | None = None, le: int | None = None) -> int:
    """``value`` is an integer (a Python or numpy int, not a bool nor a tensor) in [ge, le]; returns it as int.
    A symbolic int (torch.compile with dynamic shapes) passes unchecked: comparing it would add guards."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({_type_name(value)})")
    value = int(value)
    if (ge is not None and value < ge) or (le is not None and value > le):
        raise ValueError(f"{name} must be an int{_interval(ge, le, True, True)}, got {value}")
    return value


def check_float(name: str, value, *, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None, kind: str = "a float") -> float:
    """``value`` is a finite real number (int or float, not a bool, str, None or tensor) within the
    given bounds; returns it as a float. A symbolic float (torch.compile) passes unchecked."""
    if isinstance(value, torch.SymFloat):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {kind}, got {value!r} ({_type_name(value)})")
    value = float(value)
    low, low_closed = (gt, False) if gt is not None else (ge, True)
    high, high_closed = (lt, False) if lt is not None else (le, True)
    ok = -math.inf < value < math.inf  # False for NaN; a comparison dynamo traces (math.isfinite breaks the graph)
    if low is not None:
        ok = ok and (value >= low if low_closed else value > low)
    if high is not None:
        ok = ok and (value <= high if high_closed else value < high)
    if not ok:
        raise ValueError(f"{name} must be a finite float{_interval(low, high, low_closed, high_closed)}, "
                         f"got {value}")
    return value


def _interval(low, high, low_closed: bool, high_closed: bool) -> str:
    """' >= 1', ' < 1', ' in [0, 1)' or '' without bounds (numbers printed as :g)."""
    if low is not None and high is not None:
        return f" in {'[' if low_closed else '('}{low:g}, {high:g}{']' if high_closed else ')'}"
    if low is not None:
        return f" {'>=' if low_closed else '>'} {low:g}"
    if high is not None:
        return f" {'<=' if high_closed else '<'} {high:g}"
    return ""


def check_dims(ndim: int, **dims) -> dict[str, int]:
    """Each keyword is an axis of a tensor of rank ``ndim`` (an int in [-ndim, ndim)); returns them
    normalised to [0, ndim). One call serves every axis argument of an op, e.g.
    ``check_dims(pred.dim(), dim=dim, standardize_dim=standardize_dim)``."""
    out = {}
    for name, value in dims.items():
        value = check_int(name, value)
        if not -ndim <= value < ndim:
            raise ValueError(f"{name}={value} is out of range for a tensor of {ndim} dimensions "
                             f"(allowed: [{-ndim}, {ndim - 1}])")
        out[name] = value % ndim
    return out


# The smallest temperature the losses accept. A logit x enters the softmax as x / T in fp32: T below
# fp32's smallest normal (2^-126) is subnormal there and 1/T overflows, and any T lets |x| / T reach
# inf once |x| > 3.4e38 · T, after which max-subtraction gives inf - inf = NaN. At T >= 1e-4 every
# |x| < 3.4e34 stays finite (any fp16 logit, any cosine similarity), and a similarity the Triton
# backward recomputes a few fp32 ulps off the forward's (|error| well below 1e-3 for unit vectors)
# moves exp() by at most e^10, far from its fp32 overflow at e^88.7.
MIN_TEMPERATURE = 1e-4


def check_temperature(name: str, value) -> float:
    return check_float(name, value, ge=MIN_TEMPERATURE)
