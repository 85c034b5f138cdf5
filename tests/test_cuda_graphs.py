"""CUDA-graph capture of a whole training step (issue 11 §6; GPU tier, skipped without CUDA).

The step is :class:`sdae_fast.train.compiled_step.TrainStep` run eagerly: capturable AdamW (step
counts and lr on the device), deferred value checks (no sync) and Triton kernels autotuned during
the warm-up, before the capture. Random draws inside the step (MAE's masks) come from the graph-safe
CUDA generator: a replay after ``torch.cuda.manual_seed(s)`` draws what an eager step does after
the same seed. MAE first (no schedule in its ``after_step``); then DINO and SdAE, whose EMA
momentum, cadence and lr / weight decay each replay must take from the device.
"""
import copy

import pytest
import torch

import sdae_fast
from sdae_fast.train.compiled_step import TrainStep
from sdae_fast.train.optim import make_optimizer

from test_compile import tiny

pytestmark = pytest.mark.gpu


def _state(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def test_captured_step_replays_and_matches_eager():
    model = tiny("mae", "triton", "cuda")
    opt = make_optimizer(model, "mae", 1e-3)
    step = TrainStep(model, model, opt)
    images = torch.randn(8, 1, 16, 16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning, AdamW state, check tables, lazy plans
        for _ in range(3):
            step(images)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_loss = step(images)

    for seed in (1, 2):
        before = _state(model, opt)
        eager_model = tiny("mae", "triton", "cuda")
        eager_model.load_state_dict(before[0])
        eager_opt = make_optimizer(eager_model, "mae", 1e-3)
        eager_opt.load_state_dict(before[1])
        eager_step = TrainStep(eager_model, eager_model, eager_opt)
        torch.cuda.manual_seed(seed)
        eager_loss = eager_step(images)
        torch.cuda.manual_seed(seed)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(captured_loss, eager_loss)
        for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
            torch.testing.assert_close(p, q, msg=name)
    sdae_fast.check_errors()


@pytest.mark.parametrize("method,warmup", [("dino", 0), ("dino", 2), ("sdae", 0)])
def test_replays_follow_the_schedules(method, warmup):
    """DINO (momentum per iteration, cosine wd; with a teacher-temperature warm-up) and SdAE (per-epoch
    EMA cadence): a captured step replayed N times, with write_schedules() before each replay,
    matches N eager steps: each replay takes its own lr / wd (host-written), EMA momentum, cadence
    and temperature (the device step counter)."""
    from sdae_fast.data import model_input
    from sdae_fast.models import build

    if warmup:
        torch.manual_seed(0)
        model = build("dino", "micro", img_size=16, patch_size=4, depth=1, backend="triton", warmup_teacher_temp=0.04,
                      teacher_temp=0.07, warmup_teacher_temp_epochs=warmup).to("cuda")
        model.set_schedule(10, 3)
        model.train()
    else:
        model = tiny(method, "triton", "cuda", steps_per_epoch=3)
    eager_model = copy.deepcopy(model)
    opt, eager_opt = make_optimizer(model, method, 1e-3), make_optimizer(eager_model, method, 1e-3)
    step, eager_step = TrainStep(model, model, opt), TrainStep(eager_model, eager_model, eager_opt)
    images = model_input(model, torch.randn(8, 1, 16, 16, device="cuda"))

    def schedule(o, i):
        for g in o.param_groups:
            g["lr"] = 1e-3 * (1 + i) / 8
            g["weight_decay"] = 0.04 + 0.01 * i if g["weight_decay"] else 0.0

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning, AdamW state, check tables, plans, counters
        for i in range(3):
            for m, o, s in ((model, opt, step), (eager_model, eager_opt, eager_step)):
                schedule(o, i)
                torch.cuda.manual_seed(i)
                s(images)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    schedule(opt, 3)
    step.write_schedules()
    with torch.cuda.graph(graph):
        captured_loss = step(images)
    for i in range(3, 9):  # crosses SdAE's epoch ends (every 3rd step updates its teacher)
        schedule(opt, i), schedule(eager_opt, i)
        step.write_schedules()
        torch.cuda.manual_seed(i)
        graph.replay()
        torch.cuda.manual_seed(i)
        eager_loss = eager_step(images)
        torch.cuda.synchronize()
        torch.testing.assert_close(captured_loss, eager_loss, rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(model.state_dict().items(), eager_model.state_dict().values()):
            if isinstance(p, torch.Tensor):
                torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"step {i}: {name}")
    sdae_fast.check_errors()
