"""SdAE against its official code (AbrahamYabo/SdAE): loss axes inside the model, the EMA key set and
cadence over 2 epochs, the teacher's own random init, drop_path, shrink_num and the no-shrink mode.

The references are written out here from a reading of the official files named in each test."""
import math

import pytest
import torch
import torch.nn.functional as F

import sdae_fast
from sdae_fast.testing import assert_close
from sdae_fast.models import build
from sdae_fast.models import sdae as sdae_module
from sdae_fast.models.vit import get_2d_sincos_pos_embed

BATCH = 4


def images(batch=BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 32, 32, generator=g)


def official_teacher_keys(depth):
    """The keys engine_pretrain.py ``weight_delivery`` hands to the teacher from models_mae's student:
    every state_dict key except decoder*, encoder_to_decoder.*, mask_token* and encoder.norm* (which
    models_mae does not have): the encoder's, the frozen sin-cos pos_embed included."""
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    keys += [f"blocks.{i}.{k}" for i in range(depth) for k in block]
    return keys + ["norm.weight", "norm.bias"]


def official_momentum_table(base, final, epochs):
    """SdAE main_pretrain.py: cosine_scheduler(base, final, epochs, niter_per_ep=1), no warm-up:
    entry e = final + (base - final)(1 + cos(pi e / epochs)) / 2."""
    return [final + 0.5 * (base - final) * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]


def test_ema_pairs_the_30_official_keys_including_the_pos_embed():
    model = build("sdae", "micro", depth=2, backend="torch")
    model.set_schedule(6, 3)
    ema = model._ema_teacher()
    expected = official_teacher_keys(2)
    assert len(expected) == 30
    assert sorted(ema.names) == sorted(f"encoder.{k}" for k in expected)
    assert not model.encoder.pos_embed.requires_grad  # the student's table is the fixed sin-cos one


def test_ema_cadence_and_values_over_two_epochs():
    # engine_pretrain.py (ema_op per_epoch, ema_frequent 1): no update inside an epoch; after its last
    # iteration every one of the 30 teacher tensors becomes m_e · t + (1 - m_e) · s.
    model = build("sdae", "micro", depth=2, backend="torch")
    epochs, spe = 2, 3
    model.set_schedule(epochs * spe, spe)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    table = official_momentum_table(0.96, 0.99, epochs)
    teacher = {k: v.double().clone() for k, v in model.teacher["encoder"].state_dict().items()}
    imgs = images()
    for it in range(epochs * spe):
        torch.manual_seed(it)
        opt.zero_grad()
        model(imgs)["loss"].backward()
        opt.step()
        model.after_step()
        if (it + 1) % spe == 0:
            m = table[it // spe]
            student = model.encoder.state_dict()
            teacher = {k: m * t + (1 - m) * student[k].double() for k, t in teacher.items()}
        now = model.teacher["encoder"].state_dict()
        for k, t in teacher.items():
            torch.testing.assert_close(now[k].double(), t, rtol=2e-7, atol=1e-7, msg=f"{k} after iteration {it}")
    # The learnable teacher table moves toward the student's sin-cos table.
    sincos = get_2d_sincos_pos_embed(64, 8, cls_token=True)[None]
    assert not torch.equal(model.teacher["encoder"].pos_embed, sincos)


def test_teacher_has_its_own_random_init_and_no_drop_path():
    # main_pretrain.py: models_teacher.vit_*(drop_path_rate=0.0) is a timm 0.3.2 VisionTransformer with
    # its own init (trunc-normal 0.02 linears, cls_token and a learnable pos_embed); the student
    # models_mae(drop_path=0.25) has torch.linspace(0, 0.25, depth) rates and MAE's xavier init.
    model = build("sdae", "micro", depth=4, drop_path_rate=0.25, backend="torch")
    t, s = model.teacher["encoder"], model.encoder
    assert [b.drop_path.rate for b in s.blocks] == [r.item() for r in torch.linspace(0, 0.25, 4)]
    assert all(b.drop_path.rate == 0.0 for b in t.blocks)
    assert not torch.equal(t.blocks[0].attn.qkv.weight, s.blocks[0].attn.qkv.weight)
    sincos = get_2d_sincos_pos_embed(64, 8, cls_token=True)[None]
    assert torch.equal(s.pos_embed, sincos) and not torch.allclose(t.pos_embed, sincos)
    for w in (t.blocks[0].attn.qkv.weight, t.blocks[1].mlp.fc1.weight, t.pos_embed, t.cls_token):
        assert 0.015 < w.std().item() < 0.025  # trunc_normal_(std=0.02): bounds ±2 (absolute) are 100 σ away
    assert 0.015 < s.cls_token.std().item() < 0.025
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)) for the student's qkv (64 -> 192)
    assert s.blocks[0].attn.qkv.weight.abs().max().item() <= math.sqrt(6 / (64 + 192))
    copy_model = build("sdae", "micro", drop_path_rate=0.25, teacher_init="student", backend="torch")
    assert torch.equal(copy_model.teacher["encoder"].blocks[1].attn.qkv.weight, copy_model.encoder.blocks[1].attn.qkv.weight)
    assert all(b.drop_path.rate == 0.0 for b in copy_model.teacher["encoder"].blocks)


def _captured_loss_inputs(model, monkeypatch):
    seen = {}
    original = sdae_module.cosine_loss

    def spy(pred, target, **kw):
        seen.update(pred=pred, target=target, **kw)
        return original(pred, target, **kw)

    monkeypatch.setattr(sdae_module, "cosine_loss", spy)
    return seen


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_loss_is_the_official_token_axis_cosine(backend, monkeypatch):
    # engine_pretrain.py: teacher output standardised over its features, then
    # 1 - F.cosine_similarity(teacher, student) with dim=1 of the (B·F, M, D) fold tensors.
    model = build("sdae", "micro", backend=backend)
    seen = _captured_loss_inputs(model, monkeypatch)
    torch.manual_seed(0)
    loss = model(images())["loss"]
    assert (seen["dim"], seen["standardize_dim"]) == (1, -1)
    pred, target = seen["pred"].detach().double(), seen["target"].double()
    assert pred.shape == (BATCH * 3, 16, 64)
    t = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    expected = 1 - F.cosine_similarity(t, pred, dim=1, eps=1e-8).mean()
    assert_close(loss, expected, dtype=torch.float32, reduction=pred.numel())


def test_no_shrink_mode_whole_image_teacher_and_feature_cosine(monkeypatch):
    # engine_pretrain.py with shrink_num None: the teacher sees all tokens; outputs[mask] and
    # teacher[mask] are (N_masked, D) and F.cosine_similarity's dim=1 is the feature axis.
    model = build("sdae", "micro", shrink_num=None, backend="torch")
    seen = _captured_loss_inputs(model, monkeypatch)
    imgs = images()
    torch.manual_seed(0)
    loss = model(imgs)["loss"]
    torch.manual_seed(0)
    m = sdae_fast.random_masking(BATCH, 64, 0.75)
    mask = m.mask.bool()
    full = model.teacher["encoder"].forward_features(imgs)[:, 1:].double()
    full = (full - full.mean(-1, keepdim=True)) / (full.var(-1, keepdim=True) + 1e-6) ** 0.5
    # The student's predictions at the masked positions, in the order the model gathered them.
    pred = seen["pred"].detach().double()
    assert pred.shape == (BATCH, 48, 64) and seen["dim"] == -1
    flat_t = full[mask]  # (B·48, D), positions in index order
    order = m.ids_masked.sort(1)
    pred_in_index_order = torch.gather(pred, 1, order.indices[..., None].expand(-1, -1, 64)).reshape(-1, 64)
    expected = 1 - F.cosine_similarity(pred_in_index_order, flat_t, dim=1).mean()
    assert_close(loss, expected, dtype=torch.float32, reduction=pred.numel())


def test_shrink_num_below_the_masked_count():
    # shrink_num 40 of 48 masked with 3 folds: the official non-multiple branch keeps 40 - 40 % 3 = 39.
    model = build("sdae", "micro", shrink_num=40, backend="torch")
    assert model.fold_size == 13
    seen = {}
    orig = model.teacher_targets
    model.teacher_targets = lambda imgs, folds: seen.setdefault("folds", folds) is not None and orig(imgs, folds)
    torch.manual_seed(3)
    model(images())
    torch.manual_seed(3)
    m = sdae_fast.random_masking(BATCH, 64, 0.75)
    assert torch.equal(seen["folds"].reshape(BATCH, 39), m.ids_masked[:, :39])
    with pytest.raises(ValueError, match="shrink_num"):
        build("sdae", "micro", shrink_num=49)


def official_sdae_forward(model, imgs, mask_ratio=0.75, folds=3):
    """SdAE's training loss composed as the official files do, with the model's weights and plain torch:
    models_mae.py forward_encoder (patch embed + pos, MAE random_masking from torch.rand(N, L), cls +
    pos[0], blocks, norm) and forward_decoder (embed, mask tokens appended then unshuffled by
    ids_restore, + decoder pos, blocks, norm, pred, cls dropped); models_teacher.py forward_teachers
    with shrink_num = all masked, ncrop_loss = folds (ids_unkeep gathered, reshaped to (B·F, ·, D),
    one cls each); engine_pretrain.py: teacher standardised over features, outputs gathered by
    ids_unkeep and reshaped alike, 1 - F.cosine_similarity(teacher, outputs).mean()."""
    enc, dec, t = model.encoder, model.decoder, model.teacher["encoder"]

    def along(x, ids):
        return torch.gather(x, 1, ids.unsqueeze(-1).repeat(1, 1, x.shape[2]))

    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    b, length, d = x.shape
    keep = int(length * (1 - mask_ratio))
    noise = torch.rand(b, length, device=x.device)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep, ids_unkeep = ids_shuffle[:, :keep], ids_shuffle[:, keep:]
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1), along(x, ids_keep)], dim=1)
    for blk in enc.blocks:
        x = blk(x)
    x = dec.embed(enc.norm(x))
    mask_tokens = dec.mask_token.repeat(b, length + 1 - x.shape[1], 1)
    x = torch.cat([x[:, :1], along(torch.cat([x[:, 1:], mask_tokens], dim=1), ids_restore)], dim=1) + dec.pos_embed
    for blk in dec.blocks:
        x = blk(x)
    outputs = dec.pred(dec.norm(x))[:, 1:]
    with torch.no_grad():
        y = along(t.patch_embed(imgs) + t.pos_embed[:, 1:], ids_unkeep)
        y = y.reshape(b * folds, y.shape[1] // folds, d)
        y = torch.cat([(t.cls_token + t.pos_embed[:, :1]).expand(y.shape[0], -1, -1), y], dim=1)
        for blk in t.blocks:
            y = blk(y)
        y = t.norm(y)[:, 1:]
        y = (y - y.mean(dim=-1, keepdim=True)) / (y.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    outputs = along(outputs, ids_unkeep).reshape(b * folds, -1, d)
    return 1 - F.cosine_similarity(y, outputs).mean()


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_whole_model_loss_and_every_gradient_match_the_official_composition(backend, dtype):
    # float64 on the reference backend: the official composition to rounding; the fused path in fp32.
    from sdae_fast.testing import triton_device

    device = triton_device() if backend == "triton" else torch.device("cpu")
    model = build("sdae", "micro", depth=2, drop_path_rate=0.25, backend=backend).to(device, dtype)
    imgs = images().to(device, dtype)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(7)
    loss = model(imgs)["loss"]
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
    torch.manual_seed(7)  # the same masking noise and drop-path draws, in the same order
    expected = official_sdae_forward(model, imgs)
    expected_grads = dict(zip(params, torch.autograd.grad(expected, list(params.values()), allow_unused=True)))
    reduction = BATCH * 65 * 64  # the longest sum behind a gradient element
    assert loss.dtype == dtype
    assert_close(loss, expected, dtype=dtype, reduction=reduction, name="loss")
    for n in params:
        assert expected_grads[n] is not None, n
        assert grads[n].dtype == dtype, n
        assert_close(grads[n], expected_grads[n], dtype=dtype, reduction=reduction, name=f"grad {n}")
