"""EMA teacher update (SPEC §2): ``ema_update_``."""
from __future__ import annotations

import torch

from .. import reference
from ..dispatch import op
from ..validate import FLOAT_DTYPES

EMA = op("ema_update_", auto_order=("cuda", "triton", "torch"))
EMA.register("torch")(reference.ema_update_)


def _fused_why_not(teacher, student, momentum) -> list[str]:
    """The multi-tensor kernels address each tensor as one flat run of elements."""
    bad = [i for i, (t, s) in enumerate(zip(teacher, student)) if not (t.is_contiguous() and s.is_contiguous())]
    return [f"pairs {bad[:5]} are not contiguous (the multi-tensor kernels read flat storage)"] if bad else []


@EMA.register("triton", why_not=_fused_why_not)
def _ema_triton(teacher, student, momentum):
    from ..kernels.ema import ema_update_ as triton_ema

    triton_ema(teacher, student, momentum)


@EMA.register("cuda", why_not=_fused_why_not)
def _ema_cuda(teacher, student, momentum):
    from ..cuda_build import extension
    from ..multi_tensor import DTYPE_CODES, momentum_args, pair_groups

    module = extension()
    m, one_minus_m, m_tensor = momentum_args(momentum, teacher[0].device)
    for g in pair_groups(teacher, student):
        module.ema_update(g.t_ptrs, g.s_ptrs, g.numels, g.block_tensor, g.block_start, DTYPE_CODES[g.t_dtype],
                          DTYPE_CODES[g.s_dtype], m, one_minus_m, m_tensor)


def as_tensor_list(x, name: str) -> list[torch.Tensor]:
    """A module gives its parameters (in order); a sequence gives its tensors."""
    if isinstance(x, torch.nn.Module):
        return [p.data for p in x.parameters()]
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a sequence of tensors or a module, not a single tensor")
    out = list(x)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(t).__name__}")
    return [t.data if isinstance(t, torch.nn.Parameter) else t for t in out]


def ema_update_(teacher, student, momentum, *, backend=None) -> None:
    """``t <- momentum·t + (1 - momentum)·s`` for every pair, in fp32, rounded once to t's dtype.

    teacher, student: equal-length sequences of tensors or modules (parameters paired by order);
    dtypes may differ per pair (a bf16 teacher of an fp32 student). momentum: float, or a 0-dim
    tensor on the tensors' device (no host sync).
    """
    teacher = as_tensor_list(teacher, "teacher")
    student = as_tensor_list(student, "student")
    if len(teacher) != len(student):
        raise ValueError(f"teacher has {len(teacher)} tensors but student has {len(student)}")
    for i, (t, s) in enumerate(zip(teacher, student)):
        if t.shape != s.shape:
            raise ValueError(f"pair {i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        if t.dtype not in FLOAT_DTYPES or s.dtype not in FLOAT_DTYPES:
            raise TypeError(f"pair {i}: dtypes must be float32/float16/bfloat16, got {t.dtype} and {s.dtype}")
        if t.device != s.device or t.device != teacher[0].device:
            raise ValueError(f"pair {i}: every tensor must be on one device, got {t.device} and {s.device}")
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0:
            raise ValueError(f"momentum must be a float or a 0-dim tensor, got shape {tuple(momentum.shape)}")
        if teacher and momentum.device != teacher[0].device:
            raise ValueError(f"momentum is on {momentum.device} but the tensors are on {teacher[0].device}")
    elif not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
    if not teacher:
        return
    EMA(teacher, student, momentum, backend=backend)
