"""compat.sdae against a float64 re-implementation of SdAE's engine_pretrain.EMA_process /
weight_delivery (AbrahamYabo/SdAE, commit 79ed28c): the student is the SdAE-student stand-in, the
teacher a timm VisionTransformer as SdAE's models_teacher."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

timm_vit = pytest.importorskip("timm.models.vision_transformer")

from sdae_fast.bench.official import OfficialSdAEStudent, official_delivery, official_ema_process  # noqa: E402
from sdae_fast.compat.sdae import EMA_process, TeacherEma, weight_delivery  # noqa: E402
from sdae_fast.testing import assert_close  # noqa: E402


def pair():
    torch.manual_seed(0)
    student = OfficialSdAEStudent()
    teacher = timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2,
                                         mlp_ratio=2.0, num_classes=0)
    return student, teacher


def perturb(student, gen):
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_weight_delivery_keys_equal_official():
    student, teacher = pair()
    ours = weight_delivery(student, 0, None)
    ref = official_delivery(student)
    assert list(ours) == list(ref) and set(ours) == set(teacher.state_dict())
    assert all(ours[k] is not None and torch.equal(ours[k], ref[k]) for k in ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_ema_process_matches_official(backend):
    student, teacher = pair()
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    schedule = np.array([0.96, 0.97, 0.99])
    gen = torch.Generator().manual_seed(3)
    for epoch in range(3):
        perturb(student, gen)
        with torch.no_grad():
            for p, q in zip(student64.parameters(), student.parameters()):
                p.copy_(q)
        official_ema_process(student64, teacher64, schedule[epoch])
        EMA_process(student, None, teacher, epoch, schedule, backend=backend)
    for (name, t), t64 in zip(teacher.named_parameters(), teacher64.parameters()):
        assert_close(t, t64, dtype=torch.float32, reduction=3, name=name)
    # the frozen student pos_embed reached the teacher's learnable one
    assert not torch.allclose(teacher.pos_embed, pair()[1].pos_embed)


def test_ema_process_follows_a_replaced_student_submodule():
    student, teacher = pair()
    student64, teacher64 = copy.deepcopy(student).double(), copy.deepcopy(teacher).double()
    schedule = np.array([0.9, 0.9])
    EMA_process(student, None, teacher, 0, schedule)
    official_ema_process(student64, teacher64, schedule[0])
    student.norm = torch.nn.LayerNorm(16, eps=1e-6)  # a new module after the pairing was made
    with torch.no_grad():
        student.norm.weight.fill_(3.0)
    student64.norm = copy.deepcopy(student.norm).double()
    EMA_process(student, None, teacher, 1, schedule)
    official_ema_process(student64, teacher64, schedule[1])
    for (name, t), t64 in zip(teacher.named_parameters(), teacher64.parameters()):
        assert_close(t, t64, dtype=torch.float32, reduction=2, name=name)


def test_teacher_ema_refuses_a_mismatched_teacher():
    student, _ = pair()
    wrong = timm_vit.VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2,
                                       mlp_ratio=2.0, num_classes=0)
    with pytest.raises(KeyError, match="missing"):
        TeacherEma(student, wrong)
