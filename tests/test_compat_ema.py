"""compat.timm.ModelEmaV3 against the real timm class; compat.lightly.update_momentum against a
float64 re-implementation of lightly's loop (sdae_fast.bench.official)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sdae_fast.bench.official import lightly_update_momentum
from sdae_fast.compat.lightly import update_momentum
from sdae_fast.compat.timm import ModelEmaV3
from sdae_fast.testing import assert_close

timm_ema = pytest.importorskip("timm.utils.model_ema")
BACKENDS = ["torch", "triton"]


def small_model():
    # Linear + BatchNorm: float buffers (running stats) and an int64 one (num_batches_tracked).
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def train_step(model, gen):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    model.train()
    model(torch.randn(6, 5, generator=gen))  # moves the BatchNorm buffers


CONFIGS = [dict(decay=0.9), dict(decay=0.99, use_warmup=True, warmup_gamma=1.0, warmup_power=0.75, min_decay=0.3),
           dict(decay=0.95, update_after_step=3), dict(decay=0.9, exclude_buffers=True)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_ema_v3_matches_timm(config, backend):
    model = small_model()
    ours = ModelEmaV3(model, **config, backend=backend)
    theirs = timm_ema.ModelEmaV3(model, **config)
    for step in range(40):
        assert ours.get_decay(step) == theirs.get_decay(step), step
    assert ours.get_decay() == theirs.get_decay()
    gen, steps = torch.Generator().manual_seed(1), 12
    for step in range(steps):
        train_step(model, gen)
        ours.update(model, step=step)
        theirs.update(model, step=step)
    mine, ref = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(ref)
    for key in ref:
        if ref[key].is_floating_point():
            assert_close(mine[key], ref[key], dtype=torch.float32, reduction=steps, name=key)
        else:
            assert torch.equal(mine[key], ref[key]), key


def test_model_ema_v3_state_dict_loads_into_timm():
    model = small_model()
    ours = ModelEmaV3(model, decay=0.5)
    train_step(model, torch.Generator().manual_seed(0))
    ours.update(model)
    theirs = timm_ema.ModelEmaV3(small_model())
    theirs.load_state_dict(ours.state_dict())
    assert ours(torch.ones(2, 5)).equal(theirs(torch.ones(2, 5)))


def test_model_ema_v3_follows_moved_storage():
    model = small_model()
    ours = ModelEmaV3(model, decay=0.5)
    ours.update(model)
    model[0].weight.data = torch.full_like(model[0].weight, 2.0)  # new storage: the plan must follow
    before = ours.module[0].weight.clone()
    ours.update(model)
    assert_close(ours.module[0].weight, 0.5 * before + 1.0, name="weight after reassignment")


def test_model_ema_v3_follows_a_replaced_submodule():
    """convert_sync_batchnorm / reset_classifier style: a submodule swapped after the EMA started
    must be averaged from the new module, as timm (which reads the state_dict each update) does."""
    model = small_model()
    ours, theirs = ModelEmaV3(model, decay=0.5), timm_ema.ModelEmaV3(model, decay=0.5)
    ours.update(model)
    theirs.update(model)
    model[3] = nn.Linear(7, 3)
    ours.update(model)
    theirs.update(model)
    for key, ref in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], ref) if not ref.is_floating_point() else \
            torch.allclose(ours.state_dict()[key], ref, rtol=1e-6, atol=1e-7), key


def test_model_ema_v3_refuses_stochastic_bf16():
    with pytest.raises(NotImplementedError, match="stochastic_rounding=False"):
        ModelEmaV3(small_model().bfloat16())
    ModelEmaV3(small_model().bfloat16(), stochastic_rounding=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_momentum_matches_lightly(backend):
    model = small_model()
    ema = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(2)
    for m in (0.9, 0.99, 0.5):
        train_step(model, gen)
        expected = copy.deepcopy(ema).double()
        lightly_update_momentum(copy.deepcopy(model).double(), expected, m)  # lightly's loop, in float64
        expected = list(expected.parameters())
        update_momentum(model, ema, m, backend=backend)
        for i, (e, p) in enumerate(zip(expected, ema.parameters())):
            assert_close(p, e, dtype=torch.float32, name=f"param {i} at m={m}")


def test_update_momentum_pairs_per_model_and_follows_storage():
    a, b = small_model(), small_model()
    ema = copy.deepcopy(a)
    update_momentum(a, ema, 0.0)  # ema == a
    update_momentum(b, ema, 0.0)  # a second model: its own plan, ema == b
    for p, q in zip(ema.parameters(), b.parameters()):
        assert torch.equal(p, q)
    b[0].bias.data = torch.zeros_like(b[0].bias)
    update_momentum(b, ema, 0.0)
    assert torch.equal(ema[0].bias, torch.zeros_like(b[0].bias))


@pytest.mark.gpu
def test_model_ema_v3_on_another_device_matches_timm():
    model = small_model().cuda()
    ours = ModelEmaV3(model, decay=0.9, device=torch.device("cpu"))
    theirs = timm_ema.ModelEmaV3(model, decay=0.9, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen).cuda())
        ours.update(model, step=step)
        theirs.update(model, step=step)
    for key, ref in theirs.state_dict().items():
        got = ours.state_dict()[key]
        assert got.device.type == "cpu"
        if ref.is_floating_point():
            assert_close(got, ref, dtype=torch.float32, reduction=3, name=key)
        else:
            assert torch.equal(got, ref), key


def test_model_ema_v3_set_copies_the_model():
    model = small_model()
    ours = ModelEmaV3(model, decay=0.9)
    train_step(model, torch.Generator().manual_seed(4))
    ours.set(model)
    for key, value in model.state_dict().items():
        assert torch.equal(ours.module.state_dict()[key], value), key


def test_model_ema_v3_copies_and_pickles_without_the_model(tmp_path):
    model = small_model()
    ours = ModelEmaV3(model, decay=0.5)
    ours.update(model)
    torch.save(ours, tmp_path / "ema.pt")
    for other in (copy.deepcopy(ours), torch.load(tmp_path / "ema.pt", weights_only=False)):
        assert other._slots is None
        other.update(model)
        ours_state = {k: v.clone() for k, v in ours.state_dict().items()}
        ours.update(model)
        for key, value in ours.state_dict().items():
            assert torch.equal(other.state_dict()[key], value), key
        ours.load_state_dict(ours_state)
