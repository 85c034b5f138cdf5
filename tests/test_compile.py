"""torch.compile(fullgraph=True) of one whole training step of every method (issue 11 §5).

A graph break would be an error here, so these also prove that nothing on a step's path asks the
host a question (``.item()``, ``bool(tensor)``, data-dependent shapes): Dynamo cannot trace those.
CPU tier: the reference backend, Dynamo's ``eager`` backend (tracing is the point; Inductor's C++
build would only add minutes), one case through AOTAutograd. GPU tier: Triton with Inductor.
"""
import copy

import pytest
import torch

import sdae_fast
from sdae_fast.data import model_input
from sdae_fast.models import build
from sdae_fast.train.compiled_step import TrainStep
from sdae_fast.train.optim import make_optimizer

METHODS = ("mae", "sdae", "mixedae", "dino")


def tiny(method, backend, device="cpu", steps_per_epoch=5):
    torch.manual_seed(0)
    model = build(method, "micro", img_size=16, patch_size=4, depth=1, backend=backend).to(device)
    model.set_schedule(10, steps_per_epoch)
    return model.train()


def warm(model):
    """Build the EMA pairing (lazy, host-side, holding views of the parameters) before any trace;
    a deepcopy after this would copy the views away from the parameters."""
    if hasattr(model, "momentum"):
        model.momentum()
    return model


def one_step(method, backend, compile_backend, device="cpu", steps_per_epoch=5, warm_first=True):
    model = tiny(method, backend, device, steps_per_epoch)
    eager_model = copy.deepcopy(model)
    if warm_first:
        warm(eager_model), warm(model)
    images = model_input(model, torch.randn(4, 1, 16, 16, device=device))  # DINO: its crops
    results = []
    for m, compiled in ((model, True), (eager_model, False)):
        opt = make_optimizer(m, method, 1e-3)
        torch.manual_seed(1)  # the same masks / crops / drop paths in both runs
        step = TrainStep(m, m, opt, compile=compiled, backend=compile_backend)
        results.append((step(images), m))
    return results


@pytest.mark.parametrize("method", METHODS)
def test_fullgraph_step_reference(method):
    (loss_c, model_c), (loss_e, model_e) = one_step(method, "torch", "eager")
    assert torch.isfinite(loss_c)
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    for (name, p), q in zip(model_c.state_dict().items(), model_e.state_dict().values()):
        if isinstance(p, torch.Tensor):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)  # capturable AdamW rounds apart
    sdae_fast.check_errors()


def test_fullgraph_step_through_aot_autograd():
    (loss_c, model_c), (loss_e, model_e) = one_step("sdae", "torch", "aot_eager")
    torch.testing.assert_close(loss_c, loss_e)
    for p, q in zip(model_c.parameters(), model_e.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.interpreter
@pytest.mark.parametrize("method", ["dino", "sdae"])
@pytest.mark.parametrize("warm_first", [True, False])
def test_fullgraph_step_with_the_triton_ema(method, warm_first):
    """The fused EMA's plan (pairing by data_ptr(), backend choice) cannot be made inside a trace:
    it is made on the host, when the EMA teacher is built or by TrainStep before the step runs
    (``warm_first=False``: nothing built before TrainStep). The compiled step updates the teacher
    exactly as the reference EMA would from the same student, and matches the eager step."""
    from sdae_fast import reference
    from sdae_fast.dispatch import triton_why_not

    if triton_why_not([torch.empty(1)]):
        pytest.skip("; ".join(triton_why_not([torch.empty(1)])))
    torch._dynamo.reset()
    # SdAE updates at the end of every epoch: one step per epoch, so this step updates.
    start = tiny(method, "triton", steps_per_epoch=1)
    momentum = start.momentum()
    (loss_c, model_c), (loss_e, model_e) = one_step(method, "triton", "eager", steps_per_epoch=1, warm_first=warm_first)
    assert model_c._ema._update.backend == "triton"
    torch.testing.assert_close(loss_c, loss_e, rtol=0, atol=0)
    names = [n for n, _ in start.teacher.named_parameters()]
    expected = [start.get_parameter("teacher." + n).detach().clone() for n in names]
    reference.ema_update_(expected, [model_c.get_parameter(n).detach() for n in names], momentum)
    for name, e in zip(names, expected):
        got = model_c.get_parameter("teacher." + name)
        assert torch.equal(got, e), name  # the compiled step's EMA is the reference's, bit for bit
        torch.testing.assert_close(got, model_e.get_parameter("teacher." + name), rtol=1e-5, atol=1e-7, msg=name)
    sdae_fast.check_errors()


@pytest.mark.parametrize("method,steps_per_epoch", [("dino", 20), ("sdae", 2)])
def test_compiled_steps_do_not_recompile_per_momentum(method, steps_per_epoch):
    """The EMA momentum changes every iteration (DINO) or epoch (SdAE): passed to the op as a float
    it was a constant of the graph, so each step compiled anew and the 9th raised
    FailOnRecompileLimitHit under fullgraph. Traced, it is an entry of a device table: at most a
    few graphs (step 0 specialised, SdAE's update / no-update epochs), and the last update is the
    reference EMA with that step's float momentum, bit for bit."""
    from torch._dynamo.utils import counters

    from sdae_fast import reference

    torch._dynamo.reset()
    counters.clear()
    model = warm(tiny(method, "torch", steps_per_epoch=steps_per_epoch))
    model.set_schedule(20, steps_per_epoch)
    warm(model)
    step = TrainStep(model, model, make_optimizer(model, method, 1e-3), compile=True, backend="eager")
    names = [n for n, _ in model.teacher.named_parameters()]
    for i in range(10):
        before = [model.get_parameter("teacher." + n).detach().clone() for n in names]
        due, momentum = model._ema_teacher().due(), model.momentum()
        step(model_input(model, torch.randn(4, 1, 16, 16)))
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    assert due  # SdAE: the 10th step ends an epoch
    reference.ema_update_(before, [model.get_parameter(n).detach() for n in names], momentum)
    for name, want in zip(names, before):
        assert torch.equal(model.get_parameter("teacher." + name), want), name


def test_compiled_dino_step_through_a_teacher_temperature_warm_up():
    """main_dino.py's ViT-S/16 recipe warms the teacher temperature up over 30 epochs: as a float it
    was a graph constant, one graph per epoch. Traced it is an entry of the per-epoch table: one
    graph over 10 warm-up epochs and past them, and the same losses as the eager steps."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    kw = dict(img_size=16, patch_size=4, depth=1, backend="torch", warmup_teacher_temp=0.04, teacher_temp=0.07,
              warmup_teacher_temp_epochs=10)
    model = build("dino", "micro", **kw)
    model.set_schedule(24, 2)
    eager = copy.deepcopy(model)
    warm(model), warm(eager)
    compiled = TrainStep(model, model, make_optimizer(model, "dino", 1e-3), compile=True, backend="eager")
    plain = TrainStep(eager, eager, make_optimizer(eager, "dino", 1e-3))
    for i in range(24):
        images = model_input(model, torch.randn(4, 1, 16, 16))
        torch.manual_seed(i)
        got = compiled(images)
        torch.manual_seed(i)
        want = plain(images)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # capturable AdamW rounds apart
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])


def test_the_first_graph_is_reused():
    """The index-range checks are registered at import and the table of checks is made by TrainStep,
    outside the trace: made in the first trace, both were new to that graph's guards, so it never
    ran again and the second step compiled the whole step once more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sdae_fast.checks._TABLES.clear()  # as in a fresh process: no op has run yet
    model = tiny("mae", "torch")
    step = TrainStep(model, model, make_optimizer(model, "mae", 1e-3), compile=True, backend="eager")
    for _ in range(3):
        step(torch.randn(4, 1, 16, 16))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_train_step_matches_optimizer_step():
    """The functional AdamW of TrainStep is optimizer.step(): same parameters and state after a step."""
    model = tiny("mae", "torch")
    ref = copy.deepcopy(model)
    images = torch.randn(4, 1, 16, 16)
    opt = make_optimizer(model, "mae", 1e-3)
    torch.manual_seed(1)
    TrainStep(model, model, opt)(images)
    ref_opt = make_optimizer(ref, "mae", 1e-3)
    torch.manual_seed(1)
    ref(images)["loss"].backward()
    ref_opt.step()
    ref.after_step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_fullgraph_step_triton_gpu(method):
    # Inductor draws its own random numbers (Philox in its kernels) unless told to call the eager
    # RNG: the masks, and so the losses, would differ from the eager step's for the same seed.
    from torch._inductor import config

    with config.patch(fallback_random=True):
        (loss_c, model_c), (loss_e, model_e) = one_step(method, "triton", "inductor", device="cuda")
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_step_has_no_sync_gpu():
    """torch.cuda.set_sync_debug_mode("error") over an eager Triton step of every method raises nothing."""
    for method in METHODS:
        model = warm(tiny(method, "triton", "cuda"))
        step = TrainStep(model, model, make_optimizer(model, method, 1e-3))
        images = model_input(model, torch.randn(8, 1, 16, 16, device="cuda"))  # DINO: its crops
        step(images)  # warm-up: autotuning, lazy tables, compilation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step(images)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        sdae_fast.check_errors()


def test_pretrain_compile_matches_eager(tmp_path):
    """``sdae-fast pretrain --compile``: the same losses as the eager run (Dynamo's eager backend
    here, to keep CI fast; Inductor is the default on the command line)."""
    from sdae_fast.train.cli import make_args
    from sdae_fast.train.loop import pretrain

    def run(out, compile_backend):
        args = make_args(method="sdae", steps=3, batch_size=8, img_size=16, out=str(out), ckpt_every=0, knn=False, export=False,
                         quiet=True, backend="torch", compile=compile_backend)
        return pretrain(args)["losses"]

    assert run(tmp_path / "c", "eager") == run(tmp_path / "e", None)


def test_pretrain_compile_does_not_recompile_per_step(tmp_path):
    """``--compile`` on DINO with a teacher-temperature warm-up, whose forward reads the model's step:
    as an int attribute of a module it was a graph constant, so every step compiled anew until
    Dynamo's limit (8), after which the forward ran eagerly; the losses are the eager run's."""
    from torch._dynamo.utils import counters

    from sdae_fast.train.cli import make_args
    from sdae_fast.train.loop import pretrain

    def run(out, compile_backend):
        args = make_args(method="dino", steps=16, batch_size=8, img_size=16, patch_size=4, out=str(out), ckpt_every=0,
                         knn=False, export=False, quiet=True, backend="torch", compile=compile_backend, workers=0,
                         model_kw={"warmup_teacher_temp_epochs": 8, "teacher_temp": 0.07, "depth": 1})
        return pretrain(args)["losses"]

    torch._dynamo.reset()
    counters.clear()
    compiled = run(tmp_path / "c", "eager")
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
    torch.testing.assert_close(compiled, run(tmp_path / "e", None), rtol=1e-5, atol=1e-6)


LOSSES = {
    "cosine_loss": (lambda x: sdae_fast.cosine_loss(x, x.detach() * 2 + 1, dim=1, backend="torch"), (2, 3, 4), 1),
    "masked_mse_loss": (lambda x: sdae_fast.masked_mse_loss(x, x.detach() + 1, torch.ones(x.shape[:2]), backend="torch"),
                        (2, 3, 4), 1),
    "dino_loss": (lambda x: sdae_fast.dino_loss(x, x.detach()[:4], torch.zeros(x.shape[1]), update_center=False,
                                                backend="torch"), (6, 5), 1),
    "homologous_contrastive_loss": (lambda x: sdae_fast.homologous_contrastive_loss(
        x, torch.zeros(x.shape[:2], dtype=torch.long), backend="torch"), (2, 4, 3), 1),
}


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_compile_with_dynamic_shapes(name):
    """dynamic=True turns the float arguments symbolic: their checks must trace (math.isfinite broke the graph)."""
    fn, shape, axis = LOSSES[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="eager", dynamic=True)
    for grow in (0, 2, 4):
        x = torch.randn(*(s + grow if i == axis else s for i, s in enumerate(shape)))
        torch.testing.assert_close(compiled(x), fn(x))
