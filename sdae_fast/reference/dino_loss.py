"""DINO's centred, sharpened cross-entropy between teacher and student views (SPEC §4)."""
import torch
import torch.distributed as dist

from .stats import accumulation_dtype


def dino_loss(student_out, teacher_out, center, *, student_temp=0.1, teacher_temp=0.04, num_global=2,
              center_momentum=0.9, update_center=True):
    """Mean over view pairs (g, v), g != v, of ``mean_b(-sum_k q_g · log p_v)``; as DINO's ``DINOLoss``.

    student_out (V·B, K), teacher_out (num_global·B, K), center (K,) or (1, K), updated in place
    after the loss when ``update_center``. The teacher and the centre are constants (no gradient),
    as in DINO and the fused kernel. This naive form keeps every softmax alive: the baseline.
    """
    batch = teacher_out.shape[0] // num_global
    views = student_out.shape[0] // batch
    acc = accumulation_dtype(student_out, teacher_out)
    student = (student_out.to(acc) / student_temp).log_softmax(dim=-1).chunk(views)
    teacher = ((teacher_out.detach().to(acc) - center.detach().to(acc).reshape(1, -1)) / teacher_temp).softmax(dim=-1)
    teacher = teacher.chunk(num_global)
    total, pairs = 0.0, 0
    for g, q in enumerate(teacher):
        for v, logp in enumerate(student):
            if v == g:
                continue
            total = total + torch.sum(-q * logp, dim=-1).mean()
            pairs += 1
    loss = total / pairs
    if update_center:
        update_center_(center, teacher_out, center_momentum)
    return loss


@torch.no_grad()
def update_center_(center, teacher_out, momentum):
    """``center <- m·center + (1 - m)·mean(teacher rows)``; the mean spans every process. Rounded as
    DINO's ``update_center``: the batch mean first, then the two products. The rows are summed in
    fp32 (float64 for float64 inputs) without an fp32 copy of the teacher; the fused loss uses it too."""
    acc = accumulation_dtype(center, teacher_out)
    batch_sum = teacher_out.sum(dim=0, dtype=acc)
    count = teacher_out.shape[0]
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(batch_sum)
        count *= dist.get_world_size()
    new = center.to(acc).reshape(-1) * momentum + batch_sum / count * (1.0 - momentum)
    center.copy_(new.reshape(center.shape).to(center.dtype))
