"""Optimiser groups, schedules, gradient hooks and the paper recipes against the official code.

The references are float64 formulas written out here from a reading of the files each test cites:
MAE = facebookresearch/mae, SdAE = AbrahamYabo/SdAE, DINO = facebookresearch/dino."""
import argparse
import copy
import math

import pytest
import torch
from torch import nn

from sdae_fast.data import model_input
from sdae_fast.models import build
from sdae_fast.train import cli, recipes
from sdae_fast.train.optim import (BETAS, StepSchedule, cancel_last_layer_gradients, clip_gradients_per_param,
                                   make_optimizer, mae_lr, param_groups, scaled_lr)
from sdae_fast.schedules import cosine_schedule, linspace_at


def names_of(model, group):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


# ------------------------------------------------------------------------------------------
# Parameter groups and betas
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["mae", "sdae"])
def test_mae_sdae_groups_are_timm_032_add_weight_decay(method):
    # main_pretrain.py (MAE and SdAE): optim_factory.add_weight_decay(model, wd) of timm 0.3.2:
    # trainable params only; 1-d or ".bias" -> [0] weight_decay 0; everything else -> [1] wd.
    model = build(method, "micro")
    groups = param_groups(model, 0.05, method)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    expected_no = {n for n, p in trainable.items() if len(p.shape) == 1 or n.endswith(".bias")}
    assert names_of(model, groups[0]) == expected_no and groups[0]["weight_decay"] == 0.0
    assert names_of(model, groups[1]) == set(trainable) - expected_no and groups[1]["weight_decay"] == 0.05
    assert {"encoder.cls_token", "decoder.mask_token"} <= names_of(model, groups[1])  # tokens are decayed
    assert not any(n.startswith("teacher.") or n.endswith("pos_embed") for n in names_of(model, groups[1]))
    opt = make_optimizer(model, method, 1e-3, 0.05)
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups)  # AdamW(..., betas=(0.9, 0.95))


def test_dino_groups_and_betas():
    # DINO utils.get_params_groups: [regularized, not_regularized (weight_decay 0)], the rule
    # "name ends with .bias or 1-d"; main_dino.py: AdamW(params_groups) with default betas.
    model = build("dino", "micro")
    groups = param_groups(model, 0.04, "dino")
    reg, unreg = names_of(model, groups[0]), names_of(model, groups[1])
    assert {"encoder.cls_token", "encoder.pos_embed", "head.last_layer.weight_v"} <= reg
    assert "head.last_layer.weight_g" not in reg | unreg  # frozen (norm_last_layer)
    assert all(n.endswith(".bias") or model.get_parameter(n).ndim == 1 for n in unreg)
    assert groups[1]["weight_decay"] == 0.0
    assert make_optimizer(model, "dino", 1e-3).param_groups[0]["betas"] == (0.9, 0.999) == BETAS["dino"]


def test_lr_scaling_rule():
    # MAE/SdAE main_pretrain.py: eff_batch_size = batch_size * accum_iter * world; lr = blr * eff / 256.
    assert scaled_lr(1.5e-4, 64 * 8 * 8) == pytest.approx(1.5e-4 * 16)
    assert scaled_lr(2.666e-4, 96 * 8) == pytest.approx(2.666e-4 * 3)
    assert recipes.accum_iter_for(4096, 64, 8) == 8 and recipes.accum_iter_for(None, 64, 8) == 1
    with pytest.raises(ValueError, match="effective batch"):
        recipes.accum_iter_for(4096, 96, 1)


# ------------------------------------------------------------------------------------------
# Schedules
# ------------------------------------------------------------------------------------------
def mae_reference_lr(it, niter, epoch, lr, min_lr, warmup, epochs):
    """util/lr_sched.py adjust_learning_rate at e = it / niter + epoch (engine_pretrain.py): lr·e/warmup
    while e < warmup, else min_lr + (lr - min_lr)(1 + cos(pi (e - warmup) / (epochs - warmup))) / 2."""
    e = it / niter + epoch
    if e < warmup:
        return lr * e / warmup
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup)))


def dino_reference_table(base, final, epochs, niter, warmup_epochs=0):
    """utils.cosine_scheduler as float64 values: warmup_epochs·niter evenly spaced values from 0 to
    base (both included), then final + (base - final)(1 + cos(pi j / n)) / 2, n the remaining entries."""
    w = warmup_epochs * niter
    ramp = [base * i / (w - 1) for i in range(w)] if w > 1 else [0.0] * w
    n = epochs * niter - w
    return ramp + [final + 0.5 * (base - final) * (1 + math.cos(math.pi * j / n)) for j in range(n)]


def _args(**kw):
    base = dict(method="mae", lr_schedule="mae", lr=1.0, min_lr=0.0, warmup_epochs=2, warmup_steps=None,
                weight_decay=0.05, weight_decay_end=None, accum_iter=1, clip_grad=None, clip_per_param=None,
                freeze_last_layer=0)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.mark.parametrize("accum", [1, 2])
def test_mae_per_iteration_warmup_and_cosine(accum):
    niter, epochs = 5, 6
    sched = StepSchedule(_args(lr=2.4e-3, min_lr=1e-5, accum_iter=accum), niter, niter * epochs)
    for step in (0, 1, 2, 3, 7, 9, 10, 11, 17, 29):
        # adjust_learning_rate runs only when data_iter_step % accum_iter == 0 (engine_pretrain.py)
        it = step % niter - (step % niter) % accum
        expected = mae_reference_lr(it, niter, step // niter, 2.4e-3, 1e-5, 2, epochs)
        assert sched.lr_at(step) == pytest.approx(expected, rel=1e-14, abs=1e-18), step
    assert sched.lr_at(0) == 0.0  # the official warm-up starts at 0
    assert mae_lr(1.0, 1.0, 0.0, 2, 6) == 0.5


def test_linspace_at_is_numpy_linspace_and_drives_the_teacher_temperature():
    import numpy as np
    for n in range(1, 7):
        table = np.linspace(0.04, 0.07, n)
        assert [linspace_at(i, 0.04, 0.07, n) for i in range(n)] == table.tolist(), n  # bit for bit
    # main_dino.py DINOLoss: np.linspace(warmup_teacher_temp, teacher_temp, warmup epochs), then constant;
    # warmup_teacher_temp left out: main_dino.py's default 0.04.
    for warm in (1, 3):
        model = build("dino", "micro", teacher_temp=0.07, warmup_teacher_temp_epochs=warm)
        model.set_schedule(8, 2)
        expected = np.concatenate([np.linspace(0.04, 0.07, warm), np.full(4 - warm, 0.07)]).tolist()
        temps = []
        for epoch in range(4):
            model.step = 2 * epoch + 1
            temps.append(model.current_teacher_temp())
        assert temps == expected, warm


def test_dino_lr_and_weight_decay_tables_per_iteration():
    niter, epochs = 4, 5
    args = _args(method="dino", lr_schedule="dino", lr=1e-3, min_lr=1e-6, warmup_epochs=2, weight_decay=0.04,
                 weight_decay_end=0.4)
    sched = StepSchedule(args, niter, niter * epochs)
    lr_table = dino_reference_table(1e-3, 1e-6, epochs, niter, warmup_epochs=2)
    wd_table = dino_reference_table(0.04, 0.4, epochs, niter)
    assert [sched.lr_at(i) for i in range(niter * epochs)] == pytest.approx(lr_table, rel=1e-13, abs=1e-18)
    assert [sched.weight_decay_at(i) for i in range(niter * epochs)] == pytest.approx(wd_table, rel=1e-13)
    assert lr_table[7] == 1e-3 and lr_table[0] == 0.0
    model = build("dino", "micro")
    opt = make_optimizer(model, "dino", 0.0, 0.04)
    for step in (0, 7, 13):
        sched.apply(opt, step)
        # main_dino.py train_one_epoch: every group gets lr_schedule[it]; group 0 wd_schedule[it]
        assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr_table[step], rel=1e-13)] * 2
        assert opt.param_groups[0]["weight_decay"] == pytest.approx(wd_table[step], rel=1e-13)
        assert opt.param_groups[1]["weight_decay"] == 0.0
    assert cosine_schedule(10 ** 6, 1.0, 0.0, 4) == pytest.approx(dino_reference_table(1.0, 0.0, 4, 1)[-1])
    # A one-iteration warm-up: np.linspace(0, base, 1) == [0], then the cosine from base.
    one = dino_reference_table(1.0, 0.0, 4, 1, warmup_epochs=1)
    assert [cosine_schedule(i, 1.0, 0.0, 4, warmup=1) for i in range(4)] == pytest.approx(one, abs=1e-15)
    assert one[:2] == [0.0, 1.0]


# ------------------------------------------------------------------------------------------
# Gradient hooks
# ------------------------------------------------------------------------------------------
def test_per_parameter_clip_matches_dino_clip_gradients():
    # utils.clip_gradients: per parameter, norm = ||grad||_2; coef = clip / (norm + 1e-6); if coef < 1: grad *= coef.
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in ((3, 4), (5,), (2, 2, 2))]
    scales = (10.0, 0.1, 2.0)
    for p, s in zip(params, scales):
        p.grad = torch.randn_like(p) * s
    expected = []
    for p in params:
        g = p.grad.clone()
        coef = 3.0 / (g.norm(2).item() + 1e-6)
        expected.append(g * coef if coef < 1 else g)
    clip_gradients_per_param(params, 3.0)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_last_layer_frozen_for_the_first_epoch(backend):
    # utils.cancel_gradients_last_layer(epoch, student, freeze_last_layer=1): in epoch 0 every
    # "last_layer" parameter's grad is None before optimizer.step, so AdamW leaves it untouched.
    torch.manual_seed(0)
    model = build("dino", "micro", norm_last_layer=False, backend=backend)
    spe = 2
    model.set_schedule(3 * spe, spe)
    args = _args(method="dino", lr_schedule="dino", lr=1e-2, min_lr=1e-6, warmup_epochs=0, weight_decay=0.04,
                 weight_decay_end=0.4, clip_per_param=3.0, freeze_last_layer=1)
    sched = StepSchedule(args, spe, 3 * spe)
    opt = make_optimizer(model, "dino", 1e-2, 0.04)
    last = {n: p for n, p in model.named_parameters() if "last_layer" in n and p.requires_grad}
    assert set(last) == {"head.last_layer.weight_g", "head.last_layer.weight_v"}
    crops = model_input(model, torch.rand(4, 1, 32, 32))  # DINO takes the data pipeline's crops
    before = {n: p.detach().clone() for n, p in last.items()}
    for step in range(spe + 1):
        if step == spe:
            before = {n: p.detach().clone() for n, p in last.items()}
        sched.apply(opt, step)
        torch.manual_seed(step)
        sched.backward_and_step(model, opt, model(crops)["loss"], step)
        model.after_step()
        if step < spe:  # epoch 0: frozen, and never seen by AdamW
            assert all(torch.equal(p, before[n]) for n, p in last.items())
            assert all(p not in opt.state for p in last.values())
    assert all(not torch.equal(p, before[n]) for n, p in last.items())  # epoch 1 trains it
    plain = nn.Linear(2, 2)
    plain.weight.grad = torch.ones(2, 2)
    cancel_last_layer_gradients(plain, 0, 1)
    assert plain.weight.grad is not None  # only names containing "last_layer"


def test_gradient_accumulation_equals_the_big_batch_step():
    # engine_pretrain.py: loss /= accum_iter; the scaler steps when (data_iter_step + 1) % accum_iter == 0.
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    b = copy.deepcopy(a)
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.1), torch.optim.AdamW(b.parameters(), lr=0.1)
    sched = StepSchedule(_args(lr=0.1, accum_iter=2, lr_schedule="warmup_cosine", warmup_epochs=None), 4, 4, 0)
    for step, rows in enumerate((slice(0, 4), slice(4, 8))):
        sched.backward_and_step(a, opt_a, ((a(x[rows]) - y[rows]) ** 2).mean(), step)
        if step == 0:
            assert all(p.grad is not None for p in a.parameters())  # accumulated, not yet stepped
    ((b(x) - y) ** 2).mean().backward()
    opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-13, atol=1e-15)
    assert all(p.grad is None for p in a.parameters())


# ------------------------------------------------------------------------------------------
# The paper recipes, pinned value by value to the official code
# ------------------------------------------------------------------------------------------
OFFICIAL = {
    "mae": {  # MAE: main_pretrain.py, PRETRAIN.md, models_mae.py, util/lr_sched.py
        "size": "base", "img_size": 224, "patch_size": 16, "epochs": 800, "warmup_epochs": 40, "batch_size": 64,
        "effective_batch": 4096, "blr": 1.5e-4, "min_lr": 0.0, "weight_decay": 0.05, "weight_decay_end": None,
        "betas": (0.9, 0.95), "lr_schedule": "mae", "clip_grad": None, "clip_per_param": None, "freeze_last_layer": 0,
        "model": {"mask_ratio": 0.75, "norm_pix_loss": True, "decoder_dim": 512, "decoder_depth": 8,
                  "decoder_heads": 16, "drop_path_rate": 0.0, "weight_init": "xavier"},
    },
    "sdae": {  # SdAE: main_pretrain.py argparse defaults, engine_pretrain.py, models_mae.py, models_teacher.py
        "size": "base", "img_size": 224, "patch_size": 16, "epochs": 300, "warmup_epochs": 60, "batch_size": 96,
        "effective_batch": 768, "blr": 2.666e-4, "min_lr": 0.0, "weight_decay": 0.04, "weight_decay_end": None,
        "betas": (0.9, 0.95), "lr_schedule": "mae", "clip_grad": None, "clip_per_param": None, "freeze_last_layer": 0,
        "model": {"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16,
                  "drop_path_rate": 0.25, "weight_init": "xavier", "shrink_num": 147, "num_folds": 3, "loss_dim": 1,
                  "teacher_init": "random", "base_momentum": 0.96, "final_momentum": 0.99,
                  "momentum_warmup_epochs": 0, "momentum_warmup": 0.0, "ema_op": "per_epoch", "ema_frequent": 1},
    },
    "dino": {  # DINO: main_dino.py argparse defaults, vision_transformer.py, utils.py
        "size": "small", "img_size": 224, "patch_size": 16, "epochs": 100, "warmup_epochs": 10, "batch_size": 64,
        "effective_batch": None, "blr": 5e-4, "min_lr": 1e-6, "weight_decay": 0.04, "weight_decay_end": 0.4,
        "betas": (0.9, 0.999), "lr_schedule": "dino", "clip_grad": None, "clip_per_param": 3.0, "freeze_last_layer": 1,
        "model": {"drop_path_rate": 0.1, "weight_init": "trunc_normal", "out_dim": 65536, "hidden_dim": 2048,
                  "bottleneck_dim": 256, "norm_last_layer": True, "use_bn_in_head": False, "base_momentum": 0.996,
                  "final_momentum": 1.0, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04,
                  "warmup_teacher_temp_epochs": 0, "student_temp": 0.1, "center_momentum": 0.9},
        "augment": {"num_local": 8, "global_scale": (0.4, 1.0), "local_scale": (0.05, 0.4)},
    },
}


@pytest.mark.parametrize("method", sorted(OFFICIAL))
def test_paper_recipe_pins_every_official_value(method):
    assert recipes.recipe(method, "paper") == OFFICIAL[method]


def test_paper_recipes_build():
    for method in ("mae", "sdae", "dino", "mixedae"):
        values = recipes.recipe(method, "paper")
        kw = dict(values["model"], depth=1)  # one block: the recipe's shapes, a fast build
        if method == "dino":
            kw.update(out_dim=256)
        model = build(method, values["size"], img_size=values["img_size"], patch_size=values["patch_size"], **kw)
        assert model.encoder.embed_dim == (384 if method == "dino" else 768)


def test_recipe_choice_defaults_on_data_and_is_printed(monkeypatch, capsys, tmp_path):
    assert cli.make_args(method="sdae").recipe == "demo"
    paper = cli.make_args(method="sdae", data=str(tmp_path))
    assert paper.recipe == "paper" and paper.size == "base" and paper.blr == 2.666e-4 and paper.lr is None
    assert paper.model_kw["ema_op"] == "per_epoch"
    override = cli.make_args(method="dino", recipe="paper", epochs=3, size="micro")
    assert override.epochs == 3 and override.size == "micro" and override.weight_decay_end == 0.4
    demo = cli.make_args(method="mae", recipe="demo")
    assert demo.lr == cli.DEFAULT_LR["mae"] and demo.size == "micro" and demo.lr_schedule == "warmup_cosine"
    import sdae_fast.train.loop as loop

    monkeypatch.setattr(loop, "pretrain", lambda args: {})
    args = argparse.ArgumentParser()
    cli.add_arguments(args)
    cli.cmd_pretrain(args.parse_args(["--method", "mae"]))
    assert "recipe: demo (the default without --data)" in capsys.readouterr().out
    cli.cmd_pretrain(args.parse_args(["--method", "mae", "--recipe", "paper"]))
    assert "recipe: paper (as asked)" in capsys.readouterr().out
