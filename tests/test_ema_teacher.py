"""EmaTeacher: pairing, exclusion, schedules, buffers, exact resume, DDP-wrapped students."""
import math

import pytest
import torch
from torch import nn

from sdae_fast import reference
from sdae_fast.ema_teacher import EmaTeacher


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


def official_cosine_table(base, final, entries, warmup=0, warmup_start=0.0):
    """The momentum table of DINO utils.py / SdAE util/cosine_scheduler.py ``cosine_scheduler``, as
    float64 values: ``warmup`` evenly spaced values from warmup_start to base (both ends included),
    then for j in 0 .. n-1 (n = entries - warmup) ``final + (base - final)(1 + cos(pi j / n)) / 2``."""
    ramp = [warmup_start + (base - warmup_start) * i / (warmup - 1) for i in range(warmup)] if warmup > 1 else \
        [warmup_start] * warmup
    n = entries - warmup
    return ramp + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / n)) for j in range(n)]


def test_cosine_schedules_per_iteration_and_per_epoch():
    # SdAE main_pretrain.py: cosine_scheduler(0.96, 0.99, epochs, niter_per_ep=1): one entry per epoch.
    table = official_cosine_table(0.96, 0.99, 4)
    ema = EmaTeacher(Toy(), base_momentum=0.96, final_momentum=0.99, total_steps=4, per="epoch", steps_per_epoch=10)
    assert [ema.momentum(i) for i in (0, 9)] == [pytest.approx(table[0], abs=1e-15)] * 2  # constant within an epoch
    for epoch in range(4):
        assert ema.momentum(10 * epoch + 3) == pytest.approx(table[epoch], abs=1e-15)
    assert ema.momentum(1000) == pytest.approx(table[-1], abs=1e-15)  # past the end: the last entry
    # DINO main_dino.py: cosine_scheduler(0.996, 1, epochs, len(data_loader)): one entry per iteration.
    table = official_cosine_table(0.996, 1.0, 12)
    ema = EmaTeacher(Toy(), total_steps=12)
    assert [ema.momentum(i) for i in range(12)] == pytest.approx(table, abs=1e-15)
    # SdAE's momentum warm-up (--momentum_teacher_warmup_ep 2 from --momentum_teacher_warmup 0.9).
    table = official_cosine_table(0.96, 0.99, 6, warmup=2, warmup_start=0.9)
    ema = EmaTeacher(Toy(), base_momentum=0.96, final_momentum=0.99, total_steps=6, per="epoch", steps_per_epoch=3,
                     warmup=2, warmup_start=0.9)
    assert [ema.momentum(3 * e) for e in range(6)] == pytest.approx(table, abs=1e-15)
    assert table[:2] == [0.9, 0.96]
    # A one-epoch warm-up is np.linspace(0.9, 0.96, 1) == [0.9]: the start value, not the base.
    table = official_cosine_table(0.96, 0.99, 4, warmup=1, warmup_start=0.9)
    ema = EmaTeacher(Toy(), base_momentum=0.96, final_momentum=0.99, total_steps=4, per="epoch", steps_per_epoch=3,
                     warmup=1, warmup_start=0.9)
    assert [ema.momentum(3 * e) for e in range(4)] == pytest.approx(table, abs=1e-15)
    assert table[0] == 0.9
    with pytest.raises(ValueError, match="steps_per_epoch"):
        EmaTeacher(Toy(), per="epoch")
    with pytest.raises(ValueError, match="steps_per_epoch"):
        EmaTeacher(Toy(), cadence="epoch")


def _run_cadence(epochs, spe, cadence, every=1, stop_at=None, state=None):
    """Train a Toy for epochs × spe iterations, calling ``step()`` after each; returns (list of
    (iteration, momentum) updates made, teacher state) or, at ``stop_at``, a checkpoint."""
    torch.manual_seed(1)
    student = Toy()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    ema = EmaTeacher(student, exclude=("decoder*", "mask_token"), base_momentum=0.96, final_momentum=0.99,
                     total_steps=epochs, per="epoch", steps_per_epoch=spe, cadence=cadence, every=every,
                     copy_buffers=False)
    start, updates = 0, []
    if state is not None:
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        start, updates = state["step"], list(state["updates"])
    for it in range(start, epochs * spe):
        if it == stop_at:
            return {"student": student.state_dict(), "opt": opt.state_dict(), "ema": ema.state_dict(),
                    "step": it, "updates": updates}
        train_step(student, opt, it)
        m = ema.step()
        if m is not None:
            updates.append((it, m))
    return updates, ema.teacher.state_dict()


def test_epoch_cadence_updates_once_per_epoch_with_that_epochs_momentum():
    # SdAE engine_pretrain.py, --ema_op per_epoch --ema_frequent 1: after the last iteration of
    # epoch e, one update with momentum_schedule[e]. 2 epochs x 3 iterations: 2 updates, not 6.
    table = official_cosine_table(0.96, 0.99, 2)
    updates, _ = _run_cadence(2, 3, "epoch")
    assert updates == [(2, pytest.approx(table[0], abs=1e-15)), (5, pytest.approx(table[1], abs=1e-15))]
    # --ema_frequent 2 (main_pretrain.py: is_ema when (epoch + 1) % ema_frequent == 0): epochs 1 and 3.
    table = official_cosine_table(0.96, 0.99, 4)
    updates, _ = _run_cadence(4, 2, "epoch", every=2)
    assert [it for it, _ in updates] == [3, 7]
    assert [m for _, m in updates] == pytest.approx([table[1], table[3]], abs=1e-15)
    # --ema_op per_ite: every iteration, with the epoch's momentum.
    table = official_cosine_table(0.96, 0.99, 2)
    updates, _ = _run_cadence(2, 3, "iteration")
    assert updates == [(i, pytest.approx(table[i // 3], abs=1e-15)) for i in range(6)]


@pytest.mark.parametrize("stop_at", [1, 2, 3, 4])
def test_epoch_cadence_resume_mid_epoch_neither_doubles_nor_skips(stop_at):
    straight_updates, straight = _run_cadence(2, 3, "epoch")
    ckpt = _run_cadence(2, 3, "epoch", stop_at=stop_at)
    resumed_updates, resumed = _run_cadence(2, 3, "epoch", state=ckpt)
    assert resumed_updates == straight_updates
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k


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


def _twin_models(method):
    """Two equal micro models of ``method`` with their EMA built (12 steps, 3 per epoch)."""
    import copy

    from sdae_fast.models import build

    torch.manual_seed(0)
    first = build(method, "micro", backend="torch")
    first.set_schedule(12, 3)
    first.momentum()
    second = copy.deepcopy(first)
    second.momentum()
    return first, second


def _move_students(models, i):
    with torch.no_grad():
        for model in models:
            for name, p in model.named_parameters():
                if not name.startswith("teacher."):
                    p.add_(0.01 * (i + 1))  # the same student move in both


def _same_teachers(a, b, i):
    for (name, x), y in zip(a.teacher.state_dict().items(), b.teacher.state_dict().values()):
        assert torch.equal(x, y), (i, name)


@pytest.mark.parametrize("method", ["sdae", "dino"])
def test_the_device_counter_path_of_a_cuda_graph_replay(method, monkeypatch):
    """Inside a CUDA-graph capture the EMA's schedule comes from the device counter: each replay
    then takes its own momentum and (SdAE's per-epoch) cadence, not the captured call's. Run step
    by step here (the capture flag forced on the CPU, every call acting as one replay), the teacher
    follows the eager schedule bit for bit: momentum 1 on the steps that do not update is t itself."""
    from sdae_fast import ema_teacher

    eager, replayed = _twin_models(method)
    for i in range(8):
        _move_students((eager, replayed), i)
        eager.after_step()
        monkeypatch.setattr(ema_teacher, "cuda_graph_capturing", lambda: True)
        replayed.after_step()
        monkeypatch.setattr(ema_teacher, "cuda_graph_capturing", lambda: False)
        _same_teachers(eager, replayed, i)
    assert int(replayed._ema._count) == 8 == eager._ema.iteration


def test_dino_temperature_warm_up_from_the_device_counter(monkeypatch):
    """Inside a capture DINO's warm-up temperature is read off the device step (the EMA's counter):
    the same loss as the eager step's float temperature, epoch after epoch (flag forced on the CPU)."""
    import copy

    from sdae_fast import ema_teacher
    from sdae_fast.data import model_input
    from sdae_fast.models import build

    torch.manual_seed(0)
    eager = build("dino", "micro", img_size=16, patch_size=4, depth=1, backend="torch", warmup_teacher_temp=0.04,
                  teacher_temp=0.07, warmup_teacher_temp_epochs=3)
    eager.set_schedule(10, 2)
    replayed = copy.deepcopy(eager)
    images = model_input(eager, torch.randn(4, 1, 16, 16))
    for model in (eager, replayed):
        torch.manual_seed(0)
        model(images)  # an eager step first, as before a capture
        model.after_step()
    for i in range(8):
        images = model_input(eager, torch.randn(4, 1, 16, 16))
        torch.manual_seed(i)
        want = eager(images)["loss"]
        monkeypatch.setattr(ema_teacher, "cuda_graph_capturing", lambda: True)
        torch.manual_seed(i)
        got = replayed(images)["loss"]
        replayed.after_step()
        monkeypatch.setattr(ema_teacher, "cuda_graph_capturing", lambda: False)
        eager.after_step()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["sdae", "dino"])
def test_eager_steps_on_a_gpu_read_the_momentum_off_the_device_table(method):
    """On a GPU an eager step takes the momentum from the device table (so a later capture records
    kernels its warm-up compiled): the teacher is the float momentum's, bit for bit (forced here)."""
    by_float, by_table = _twin_models(method)
    by_table._ema._momentum_on_device = True
    for i in range(7):
        _move_students((by_float, by_table), i)
        by_float.after_step(), by_table.after_step()
        _same_teachers(by_float, by_table, i)
