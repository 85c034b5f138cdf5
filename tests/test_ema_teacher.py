"""EmaTeacher: pairing, exclusion, schedules, buffers, exact resume, DDP-wrapped students."""
import math

import pytest
import torch
from torch import nn

from sdae_fast import reference
from sdae_fast.ema_teacher import EmaTeacher, cosine_momentum


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
        self.decoder = nn.Linear(3, 4)
        self.mask_token = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.decoder(self.encoder(x)).sum() + self.mask_token.sum()


def train_step(model, opt, seed):
    torch.manual_seed(seed)
    opt.zero_grad()
    model(torch.randn(8, 4)).backward()
    opt.step()


def test_exclude_patterns_drop_student_only_parts():
    student = Toy()
    teacher = Toy().encoder
    ema = EmaTeacher(student.encoder, teacher, total_steps=10)
    assert ema.names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    full = EmaTeacher(student, exclude=("decoder*", "mask_token"), total_steps=10)
    assert all(not n.startswith("decoder") and n != "mask_token" for n in full.names)
    predicate = EmaTeacher(student, exclude=lambda n: "bias" in n, total_steps=10)
    assert all("bias" not in n for n in predicate.names)


def test_missing_student_parameter_is_an_error():
    with pytest.raises(KeyError, match="without a student counterpart"):
        EmaTeacher(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3)), total_steps=1)


def test_cosine_schedules_per_iteration_and_per_epoch():
    assert cosine_momentum(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    ema = EmaTeacher(Toy(), base_momentum=0.96, final_momentum=0.99, total_steps=4, per="epoch", steps_per_epoch=10)
    assert [ema.momentum(i) for i in (0, 9)] == [pytest.approx(0.96)] * 2  # constant within an epoch
    assert ema.momentum(20) == pytest.approx(0.975)
    assert ema.momentum(40) == pytest.approx(0.99)
    assert ema.momentum(1000) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        EmaTeacher(Toy(), per="epoch")


def test_update_matches_reference_and_copies_buffers():
    student = Toy()
    ema = EmaTeacher(student, exclude=("decoder*", "mask_token"), total_steps=10)
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    train_step(student, opt, 0)
    expected = [t.clone() for t in ema._teacher_params]
    reference.ema_update_(expected, ema._student_params, ema.momentum())
    m = ema.update()
    assert m == pytest.approx(0.996)
    for t, e in zip(ema._teacher_params, expected):
        assert torch.equal(t, e)
    assert torch.equal(ema.teacher.encoder[1].running_mean, student.encoder[1].running_mean)
    assert all(not p.requires_grad for p in ema.teacher.parameters())


def test_resume_continues_exactly():
    def run(stop_at=None, state=None):
        torch.manual_seed(1)
        student = Toy()
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        ema = EmaTeacher(student, exclude=("decoder*", "mask_token"), total_steps=6)
        start = 0
        if state is not None:
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["opt"])
            ema.load_state_dict(state["ema"])
            start = state["step"]
        for step in range(start, 6):
            if step == stop_at:
                return {"student": student.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(), "step": step}
            train_step(student, opt, step)
            ema.update()
        return ema.teacher.state_dict()

    straight = run()
    resumed = run(state=run(stop_at=3))
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


def test_ddp_wrapped_student_pairs_the_module():
    wrapper = type("DistributedDataParallel", (nn.Module,), {})()
    wrapper.module = Toy()
    ema = EmaTeacher(wrapper, exclude=("decoder*", "mask_token"), total_steps=2)
    assert ema._student_params[0].data_ptr() == wrapper.module.encoder[0].weight.data_ptr()
    assert math.isclose(ema.update(), 0.996)
