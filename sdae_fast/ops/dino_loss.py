"""DINO's centred cross-entropy (SPEC §4): ``dino_loss``."""
from __future__ import annotations

import torch

from .. import checks, reference
from ..dispatch import op
from ..reference.stats import accumulation_dtype
from ..validate import (MIN_TEMPERATURE, check_float, check_int, check_same_device, check_temperature, check_tensor,
                        names_its_errors)

DINO_LOSS = op("dino_loss", auto_order=("triton", "torch"),
               schema="(Tensor student_out, Tensor teacher_out, Tensor(a!) center, *, float student_temp=0.1, "
                      "float teacher_temp=0.04, int num_global=2, float center_momentum=0.9, bool update_center=True)"
                      " -> Tensor")
DINO_LOSS.register("torch")(reference.dino_loss)
TEACHER_TEMP_RANGE = checks.register("dino_loss", ValueError, f"the teacher_temp tensor must be >= {MIN_TEMPERATURE}, "
                                     "got {f0}")

MAX_VIEWS, MAX_GLOBAL = 64, 8  # the fused kernel keeps a (global × views × BLOCK_K) tile in registers


def _triton_why_not(student_out, teacher_out, center, *, num_global=2, **_):
    batch = teacher_out.shape[0] // num_global
    views = student_out.shape[0] // batch
    reasons = []
    if views > MAX_VIEWS:
        reasons.append(f"{views} student views exceed the fused kernel's {MAX_VIEWS}")
    if num_global > MAX_GLOBAL:
        reasons.append(f"num_global={num_global} exceeds the fused kernel's {MAX_GLOBAL}")
    return reasons


@DINO_LOSS.register("triton", why_not=_triton_why_not)
def _triton(*args, **kwargs):
    from ..kernels.dino_loss import dino_loss as fused

    return fused(*args, **kwargs)


@names_its_errors('dino_loss')
def dino_loss(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04, num_global=2,
              center_momentum=0.9, update_center=True, backend=None):
    """Mean over view pairs g != v of ``mean_b(-sum_k softmax((t_g - c)/Tt) · log_softmax(s_v/Ts))``.

    student_out (V·B, K) for V views; teacher_out (num_global·B, K), a constant; center (K,) or
    (1, K), updated in place after the loss (all-reduced across processes) when ``update_center``.
    Returns an fp32 scalar (float64 for float64 inputs, on the torch reference only: for fidelity
    checks; triton refuses them). Both temperatures must be at least
    :data:`sdae_fast.validate.MIN_TEMPERATURE` (1e-4): below it the fp32 logits / T overflow for
    ordinary logits and the softmaxes become NaN (see there).

    Backends: ``torch`` (the reference) and ``triton`` (two streaming sweeps over the logits that
    also produce the student gradient; never a softmax of width K; up to 64 views, 8 global).

    ``teacher_temp`` may also be a 0-dim floating tensor on the inputs' device (a schedule under
    torch.compile: a float is a constant of the graph, one graph per value). The teacher logits
    are then sharpened before the op, ``(t - c) · fp32(1 / T)``, as the Triton kernel forms them
    from a float (so that path's result is the float's, bit for bit); its range is checked on the
    device (``sdae_fast.check_errors``), with no host sync.
    """
    check_tensor("student_out", student_out, ndim=2)
    check_tensor("teacher_out", teacher_out, ndim=2)
    check_tensor("center", center, ndim=(1, 2))
    width = teacher_out.shape[1]
    num_global = check_int("num_global", num_global, ge=1)
    student_temp = check_temperature("student_temp", student_temp)
    if not isinstance(teacher_temp, torch.Tensor):
        teacher_temp = check_temperature("teacher_temp", teacher_temp)
    center_momentum = check_float("center_momentum", center_momentum, ge=0.0, le=1.0)
    if student_out.shape[1] != width or center.numel() != width or center.shape[-1] != width:
        raise ValueError(f"student_out {tuple(student_out.shape)}, teacher_out {tuple(teacher_out.shape)} and "
                         f"center {tuple(center.shape)} must share the output width K")
    if width == 0:
        raise ValueError("the output width K of student_out, teacher_out and center must be >= 1, got K = 0 "
                         "(a softmax over no classes)")
    if teacher_out.shape[0] == 0 or teacher_out.shape[0] % num_global:
        raise ValueError(f"teacher_out has {teacher_out.shape[0]} rows, not a positive multiple of num_global={num_global}")
    batch = teacher_out.shape[0] // num_global
    if student_out.shape[0] % batch:
        raise ValueError(f"student_out has {student_out.shape[0]} rows, not a multiple of the batch {batch}")
    views = student_out.shape[0] // batch
    if views < 2 and num_global <= views:
        raise ValueError(f"{views} student view(s) and {num_global} teacher view(s) make no pair g != v")
    check_same_device(student_out=student_out, teacher_out=teacher_out, center=center)
    if isinstance(teacher_temp, torch.Tensor):
        sharpened = _sharpened(teacher_out, center, teacher_temp)
        loss = DINO_LOSS(student_out, sharpened, torch.zeros_like(center), student_temp=student_temp,
                         teacher_temp=1.0, num_global=num_global, center_momentum=center_momentum,
                         update_center=False, backend=backend)
        if update_center:  # the op's own update, on the teacher as given
            reference.update_center_(center, teacher_out.detach(), center_momentum)
        return loss
    return DINO_LOSS(student_out, teacher_out, center, student_temp=student_temp, teacher_temp=teacher_temp,
                     num_global=num_global, center_momentum=center_momentum, update_center=update_center,
                     backend=backend)


def _sharpened(teacher_out, center, teacher_temp):
    """``(t - c) · fp32(1 / T)`` in fp32 (float64 for float64 inputs) for a 0-dim tensor T."""
    if teacher_temp.dim() != 0 or not teacher_temp.is_floating_point():
        raise TypeError(f"teacher_temp must be a float or a 0-dim floating tensor, got a {teacher_temp.dtype} "
                        f"tensor of shape {tuple(teacher_temp.shape)}")
    check_same_device(teacher_out=teacher_out, teacher_temp=teacher_temp)
    checks.fail_if(TEACHER_TEMP_RANGE, ~(teacher_temp >= MIN_TEMPERATURE), checks.float_bits(teacher_temp))  # NaN fails
    acc = accumulation_dtype(teacher_out, center)
    inv = (1.0 / teacher_temp.detach().to(torch.float64)).to(acc)
    return (teacher_out.detach().to(acc) - center.detach().to(acc).reshape(1, -1)) * inv


@names_its_errors('update_center_')
def update_center_(center, teacher_out, momentum):
    """``center <- momentum·center + (1 - momentum)·mean(teacher_out rows)`` in place, the mean over
    every process when torch.distributed is initialised. center (K,) or (1, K); teacher_out (R, K);
    float64 ones are averaged in float64."""
    check_tensor("center", center, ndim=(1, 2))
    check_tensor("teacher_out", teacher_out, ndim=2)
    if center.numel() != teacher_out.shape[1] or center.shape[-1] != teacher_out.shape[1]:
        raise ValueError(f"center {tuple(center.shape)} and teacher_out {tuple(teacher_out.shape)} must share the width K")
    if teacher_out.shape[0] == 0:
        raise ValueError("teacher_out has no rows: the mean of no teacher outputs is undefined")
    momentum = check_float("momentum", momentum, ge=0.0, le=1.0)
    check_same_device(center=center, teacher_out=teacher_out)
    reference.update_center_(center, teacher_out, momentum)
