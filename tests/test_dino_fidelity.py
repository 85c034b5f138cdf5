"""DINO against its official code (facebookresearch/dino): local-crop position interpolation, ViT and
head initialisation, head options, the teacher's state. References written out from a reading of
vision_transformer.py and main_dino.py."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdae_fast.models import build
from sdae_fast.models.dino_head import DINOHead
from sdae_fast.models.vit import VisionTransformer, interpolate_pos_embed
from sdae_fast.testing import assert_close


def cubic_weights(t, a=-0.75):
    """PyTorch's bicubic convolution weights (Keys, a = -0.75) for the 4 taps around a point at
    fraction t past the second tap."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in, n_out, scale_factor):
    """(n_out, n_in) float64 matrix of ``interpolate(scale_factor=s, mode="bicubic")`` along one axis:
    given a scale factor PyTorch samples output i at ``(i + 0.5) / s - 0.5`` (not at n_in / n_out
    spacing), taps clamped to the border."""
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = (i + 0.5) / scale_factor - 0.5
        base = math.floor(x)
        for k, c in enumerate(cubic_weights(x - base)):
            w[i, min(max(base - 1 + k, 0), n_in - 1)] += c
    return w


def official_interpolated_table(table, grid_out):
    """vision_transformer.py ``interpolate_pos_encoding`` for a w0 x h0 patch grid: the patch part of
    the (1 + N, D) table, as an (√N, √N) image per channel, bicubically rescaled by
    ``((w0 + 0.1) / √N, (h0 + 0.1) / √N)``; the cls row kept."""
    n = table.shape[0] - 1
    side = int(math.sqrt(n))
    w0, h0 = grid_out
    rows = bicubic_matrix(side, w0, (w0 + 0.1) / math.sqrt(n))
    cols = bicubic_matrix(side, h0, (h0 + 0.1) / math.sqrt(n))
    patch = table[1:].reshape(side, side, -1)
    out = torch.einsum("ai,ijd,bj->abd", rows, patch, cols).reshape(w0 * h0, -1)
    return torch.cat([table[:1], out])


@pytest.mark.parametrize("side_in, side_out", [(14, 6), (8, 4), (7, 3)])
def test_local_crop_position_interpolation_matches_official(side_in, side_out):
    # 224 px / 16 = 14 patches per side; a 96 px local crop has 6. fp64 in, fp64 out.
    table = torch.randn(1 + side_in ** 2, 24, dtype=torch.float64, requires_grad=True)
    ours = interpolate_pos_embed(table, (side_out, side_out))
    expected = official_interpolated_table(table, (side_out, side_out))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(ours)
    (g_ours,) = torch.autograd.grad(ours, table, up)
    (g_ref,) = torch.autograd.grad(expected, table, up)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-12)
    # The quirk matters: interpolating to size= differs.
    by_size = interpolate_pos_embed(table, (side_out, side_out), offset=None)
    assert (by_size - expected).norm() > 1e-3 * expected.norm()


def test_encoder_uses_the_official_interpolation_for_local_crops():
    vit = VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2,
                            pos_embed="learned", weight_init="trunc_normal").double()
    table = vit.pos_embed[0]
    assert torch.allclose(vit.pos_embed_for((4, 4)), official_interpolated_table(table.detach(), (4, 4)), atol=1e-13)


def official_head(in_dim, out_dim, hidden, bottleneck, use_bn=False, norm_last_layer=True):
    """DINOHead as vision_transformer.py builds it, with torch's own modules: hidden linears (+BN)
    + GELU, a bottleneck linear, trunc-normal(0.02) init of those linears with zero bias, THEN
    weight_norm(nn.Linear(bottleneck, out, bias=False)) with weight_g filled with 1."""
    layers = [nn.Linear(in_dim, hidden)] + ([nn.BatchNorm1d(hidden)] if use_bn else []) + [nn.GELU()]
    layers += [nn.Linear(hidden, hidden)] + ([nn.BatchNorm1d(hidden)] if use_bn else []) + [nn.GELU()]
    layers += [nn.Linear(hidden, bottleneck)]
    mlp = nn.Sequential(*layers)
    for m in mlp:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.constant_(m.bias, 0)
    with pytest.warns(FutureWarning):
        last = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    last.weight_g.data.fill_(1)
    last.weight_g.requires_grad = not norm_last_layer
    return mlp, last


@pytest.mark.parametrize("use_bn", [False, True])
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_init_and_forward_match_official(use_bn, norm_last_layer):
    torch.manual_seed(0)
    ours = DINOHead(12, 40, 16, 8, use_bn=use_bn, norm_last_layer=norm_last_layer).double()
    torch.manual_seed(0)
    mlp, last = official_head(12, 40, 16, 8, use_bn, norm_last_layer)
    mlp, last = mlp.double(), last.double()
    official = dict(mlp.named_parameters(prefix="mlp")) | dict(last.named_parameters(prefix="last_layer"))
    mine = dict(ours.named_parameters())
    assert set(mine) == set(official)
    for k in mine:
        assert torch.equal(mine[k], official[k]), k  # same draws, same order: the same weights
        assert mine[k].requires_grad == official[k].requires_grad, k
    x = torch.randn(5, 12, dtype=torch.float64)
    out = ours(x)
    expected = last(F.normalize(mlp(x), dim=-1, p=2))
    torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-14)
    gv, = torch.autograd.grad(out.square().sum(), ours.last_layer.weight_v)
    ge, = torch.autograd.grad(expected.square().sum(), last.weight_v)
    torch.testing.assert_close(gv, ge, rtol=1e-12, atol=1e-14)


def test_vit_init_per_method():
    # DINO vision_transformer.py: trunc_normal_(std=.02) for pos_embed, cls_token and every Linear;
    # the Conv2d patch projection keeps PyTorch's init. MAE models_mae.py: xavier-uniform Linears
    # and patch projection (as a Linear), normal(0.02) cls token.
    dino = build("dino", "small", img_size=64, depth=2).encoder
    mae = build("mae", "small", img_size=64, depth=2).encoder
    qkv = dino.blocks[0].attn.qkv.weight
    assert 0.019 < qkv.std().item() < 0.021
    assert 0.018 < dino.pos_embed.std().item() < 0.022 and dino.pos_embed.requires_grad
    fan_in = 3 * 16 * 16
    assert dino.patch_embed.proj.weight.abs().max().item() <= 1 / math.sqrt(fan_in)  # kaiming-uniform(a=√5)
    bound = math.sqrt(6 / (384 + 3 * 384))
    w = mae.blocks[0].attn.qkv.weight
    assert w.abs().max().item() <= bound and w.std().item() > 0.8 * bound / math.sqrt(3)


def test_teacher_state_and_drop_path():
    # main_dino.py: student vit(drop_path_rate=0.1), teacher vit() without drop path, teacher loaded
    # from the student's weights; both heads alike.
    model = build("dino", "micro", depth=3)
    assert [b.drop_path.rate for b in model.encoder.blocks] == [r.item() for r in torch.linspace(0, 0.1, 3)]
    assert all(b.drop_path.rate == 0.0 for b in model.teacher["encoder"].blocks)
    for (n, t), (_, s) in zip(model.teacher["encoder"].state_dict().items(), model.encoder.state_dict().items()):
        assert torch.equal(t, s), n
    model.train()
    assert model.encoder.training and not any(m.training for m in model.teacher.modules())
    bn = build("dino", "micro", use_bn_in_head=True)
    bn.train()
    assert any(isinstance(m, nn.BatchNorm1d) for m in bn.head.modules())
    assert all(m.training for m in bn.teacher.modules())  # the official teacher uses batch statistics
    assert all(b.drop_path.rate == 0.0 for b in bn.teacher["encoder"].blocks)
    bn.eval()
    assert not any(m.training for m in bn.teacher.modules())


def test_every_parameter_pair_is_averaged():
    # main_dino.py zips all student and teacher parameters, weight_g included.
    model = build("dino", "micro")
    model.set_schedule(4, 2)
    names = model._ema_teacher().names
    assert sorted(names) == sorted(n for n, _ in model.teacher.named_parameters())
    assert "head.last_layer.weight_g" in names
    copy.deepcopy(model).after_step()


# --- the whole model in float64 ---------------------------------------------------------------
# main_dino.py (train_one_epoch, DINOLoss, MultiCropWrapper in utils.py) and vision_transformer.py
# (VisionTransformer.prepare_tokens / forward, Block, Attention, drop_path, DINOHead) at commit 04c0ad9,
# written out from a reading of those files, functionally on the model's own parameters.
def official_drop_path(x, rate, training):
    """vision_transformer.py drop_path: per sample, floor(keep + U[0, 1)) in x's dtype, x / keep · mask."""
    if rate == 0.0 or not training:
        return x
    keep = 1 - rate
    return x.div(keep) * (keep + torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype)).floor_()


def official_vit_cls(p, crops, patch, heads, rates, training):
    """VisionTransformer.forward on one resolution: conv patch embedding, cls prepended, the position
    table (bicubic-rescaled for another grid) added, pre-norm blocks (x + drop_path(attn(norm1 x)),
    x + drop_path(mlp(norm2 x))), final norm, the cls token."""
    x = F.conv2d(crops, p["patch_embed.proj.weight"], p["patch_embed.proj.bias"], stride=patch).flatten(2).transpose(1, 2)
    b, n, d = x.shape
    x = torch.cat([p["cls_token"].expand(b, -1, -1), x], dim=1)
    table = p["pos_embed"][0]
    side = crops.shape[-1] // patch
    x = x + (table if side * side == table.shape[0] - 1 else official_interpolated_table(table, (side, side)))
    for i, rate in enumerate(rates):
        k = f"blocks.{i}."
        y = F.layer_norm(x, (d,), p[k + "norm1.weight"], p[k + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, p[k + "attn.qkv.weight"], p[k + "attn.qkv.bias"]).reshape(b, n + 1, 3, heads, d // heads)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q @ kk.transpose(-2, -1) * (d // heads) ** -0.5).softmax(dim=-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, n + 1, d), p[k + "attn.proj.weight"], p[k + "attn.proj.bias"])
        x = x + official_drop_path(y, rate, training)
        y = F.layer_norm(x, (d,), p[k + "norm2.weight"], p[k + "norm2.bias"], eps=1e-6)
        y = F.linear(F.gelu(F.linear(y, p[k + "mlp.fc1.weight"], p[k + "mlp.fc1.bias"])), p[k + "mlp.fc2.weight"],
                     p[k + "mlp.fc2.bias"])
        x = x + official_drop_path(y, rate, training)
    return F.layer_norm(x, (d,), p["norm.weight"], p["norm.bias"], eps=1e-6)[:, 0]


def official_head_forward(p, x):
    """DINOHead.forward (nlayers 3, no BN): linear-GELU-linear-GELU-linear, L2 normalise, then the
    weight-normalised last layer W = g · v / ||v|| (norm per output row), no bias."""
    x = F.gelu(F.linear(x, p["mlp.0.weight"], p["mlp.0.bias"]))
    x = F.gelu(F.linear(x, p["mlp.2.weight"], p["mlp.2.bias"]))
    x = F.normalize(F.linear(x, p["mlp.4.weight"], p["mlp.4.bias"]), dim=-1, p=2)
    v, g = p["last_layer.weight_v"], p["last_layer.weight_g"]
    return F.linear(x, v * g / v.norm(dim=1, keepdim=True))


def official_multicrop(p, head, crops_by_resolution, patch, heads, rates, training):
    """MultiCropWrapper.forward: each run of same-resolution crops through the backbone at once, the
    cls outputs concatenated, the head once over all of them."""
    feats = torch.cat([official_vit_cls(p, c, patch, heads, rates, training) for c in crops_by_resolution])
    return official_head_forward(head, feats)


def official_dino_loss(student_output, teacher_output, center, ncrops, student_temp, temp):
    """DINOLoss.forward: student logits / student_temp in ncrops chunks; teacher softmax((t - c) / temp)
    in 2 chunks; the mean over pairs iq != v of mean_b(sum_k -q · log_softmax(s_v))."""
    student_out = (student_output / student_temp).chunk(ncrops)
    teacher_out = F.softmax((teacher_output - center) / temp, dim=-1).detach().chunk(2)
    total, terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(ncrops):
            if v != iq:
                total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
                terms += 1
    return total / terms


def test_whole_model_step_matches_the_official_composition_in_float64():
    torch.manual_seed(0)
    model = build("dino", "micro", depth=2, drop_path_rate=0.3, warmup_teacher_temp=0.04, teacher_temp=0.07,
                  warmup_teacher_temp_epochs=3, backend="torch").double()
    model.train()
    with torch.no_grad():  # a teacher and centre some way into training, not the student's copy and zero
        for t in model.teacher.parameters():
            t.add_(0.01 * torch.randn_like(t))
        model.center.normal_(0, 0.1)
    model.set_schedule(20, 5)  # 4 epochs of 5 iterations
    model.step = 7  # global iteration 7: epoch 1 of the teacher-temperature warm-up
    batch, heads, patch = 2, model.encoder.blocks[0].attn.num_heads, model.encoder.patch_size
    crops = [torch.randn(2 * batch, 1, 32, 32, dtype=torch.float64), torch.randn(2 * batch, 1, 16, 16, dtype=torch.float64)]
    rates = [b.drop_path.rate for b in model.encoder.blocks]
    assert rates == [r.item() for r in torch.linspace(0, 0.3, 2)]  # the official dpr (float32 linspace)
    assert all(b.drop_path.rate == 0.0 for b in model.teacher["encoder"].blocks)
    student = {n: p for n, p in model.named_parameters() if p.requires_grad}
    enc = {n[len("encoder."):]: p for n, p in student.items() if n.startswith("encoder.")}
    head = {n[len("head."):]: p for n, p in model.named_parameters() if n.startswith("head.")}
    t_enc = {n: p.detach().clone() for n, p in model.teacher["encoder"].named_parameters()}
    t_head = {n: p.detach().clone() for n, p in model.teacher["head"].named_parameters()}
    center = model.center.detach().clone()

    torch.manual_seed(11)
    loss = model(crops)["loss"]
    grads = dict(zip(student, torch.autograd.grad(loss, list(student.values()))))
    torch.manual_seed(11)  # the same drop-path draws: the teacher (no drop path) draws none
    with torch.no_grad():
        teacher_output = official_multicrop(t_enc, t_head, crops[:1], patch, heads, [0.0] * len(rates), False)
    student_output = official_multicrop(enc, head, crops, patch, heads, rates, True)
    temp = float(torch.linspace(0.04, 0.07, 3, dtype=torch.float64)[1])  # np.linspace(warmup, temp, 3)[epoch 1]
    expected = official_dino_loss(student_output, teacher_output, center, 4, 0.1, temp)
    expected_grads = dict(zip(student, torch.autograd.grad(expected, list(student.values()))))
    reduction = 4 * batch * 256  # the longest sum behind a gradient element (views · batch · K)
    assert loss.dtype == torch.float64
    assert_close(loss, expected, dtype=torch.float64, reduction=reduction, name="loss")
    for n in student:
        assert grads[n].dtype == torch.float64, n
        assert_close(grads[n], expected_grads[n], dtype=torch.float64, reduction=reduction, name=f"grad {n}")
    # DINOLoss.update_center: c <- 0.9 c + 0.1 · mean of the teacher rows (one process).
    assert_close(model.center, center * 0.9 + teacher_output.sum(0, keepdim=True) / len(teacher_output) * 0.1,
                 dtype=torch.float64, reduction=len(teacher_output), name="center")

    # One SGD step, then train_one_epoch's EMA: t <- m t + (1 - m) s with utils.cosine_scheduler(0.996, 1)
    # at global iteration 7 of 20, over every parameter pair.
    lr = 0.5
    with torch.no_grad():
        for n, p in student.items():
            p.sub_(lr * grads[n])
    m = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * 7 / 20))
    model.after_step()
    new_student = dict(model.named_parameters())
    for part, old in (("encoder", t_enc), ("head", t_head)):
        for n, t in old.items():
            want = m * t + (1 - m) * new_student[f"{part}.{n}"].detach()
            assert_close(dict(model.teacher[part].named_parameters())[n], want, dtype=torch.float64, name=f"teacher {part}.{n}")
