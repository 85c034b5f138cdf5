"""DINO's centred cross-entropy (SPEC §4): ``dino_loss``."""
from __future__ import annotations

from .. import reference
from ..dispatch import op
from ..validate import check_float, check_int, check_same_device, check_temperature, check_tensor, names_its_errors

DINO_LOSS = op("dino_loss", auto_order=("triton", "torch"),
               schema="(Tensor student_out, Tensor teacher_out, Tensor(a!) center, *, float student_temp=0.1, "
                      "float teacher_temp=0.04, int num_global=2, float center_momentum=0.9, bool update_center=True)"
                      " -> Tensor")
DINO_LOSS.register("torch")(reference.dino_loss)

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
    """
    check_tensor("student_out", student_out, ndim=2)
    check_tensor("teacher_out", teacher_out, ndim=2)
    check_tensor("center", center, ndim=(1, 2))
    width = teacher_out.shape[1]
    num_global = check_int("num_global", num_global, ge=1)
    student_temp = check_temperature("student_temp", student_temp)
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
    return DINO_LOSS(student_out, teacher_out, center, student_temp=student_temp, teacher_temp=teacher_temp,
                     num_global=num_global, center_momentum=center_momentum, update_center=update_center,
                     backend=backend)


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
