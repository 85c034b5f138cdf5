"""build(method, size, encoder=<timm VisionTransformer>): the four methods on real timm ViTs.

The timm model's own parameters are trained (no copies); the method gives the same loss and
gradients as on the built-in ViT carrying the same weights; pretrain trains, exports (loads strict
into timm.create_model) and evaluates (k-NN) it like the built-in ViT."""
from __future__ import annotations

import copy
import json

import pytest
import torch

timm = pytest.importorskip("timm")

from sdae_fast.models import VisionTransformer, build  # noqa: E402
from sdae_fast.models.timm_encoder import TimmEncoder  # noqa: E402
from sdae_fast.testing import assert_close  # noqa: E402
from sdae_fast.data import model_input  # noqa: E402 (DINO takes the data pipeline's crops)

METHODS = ["mae", "sdae", "mixedae", "dino"]


def tiny_vit(**kw):
    cfg = dict(num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, in_chans=3)
    cfg.update(kw)
    return timm.create_model("vit_base_patch16_224", pretrained=False, **cfg)


def test_embed_equals_timm_forward():
    vit = tiny_vit().eval()
    enc = TimmEncoder(vit).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(enc.embed(x), vit(x), reduction=32, name="embed vs timm")
        assert enc.embed(torch.randn(2, 3, 16, 16)).shape == (2, 32)  # another resolution: interpolated table
    assert list(enc.state_dict()) == list(vit.state_dict())


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_the_timm_parameters(method):
    vit = tiny_vit()
    before = copy.deepcopy(vit.state_dict())
    model = build(method, "micro", encoder=vit, backend="torch")
    assert model.encoder.cls_token is vit.cls_token and model.encoder.blocks is vit.blocks
    model.set_schedule(4, 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(2):
        loss = model(model_input(model, torch.rand(4, 3, 32, 32)))["loss"]
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.after_step()
    assert not torch.equal(vit.cls_token, before["cls_token"])
    assert not torch.equal(vit.blocks[0].mlp.fc1.weight, before["blocks.0.mlp.fc1.weight"])
    if method == "mixedae":  # homologous attention on the timm blocks, same parameter names
        assert type(vit.blocks[0].attn).__name__ == "TimmTopKAttention"
        assert list(vit.state_dict()) == list(before)


@pytest.mark.parametrize("method", ["mae", "sdae"])
def test_same_loss_and_grads_as_the_builtin_vit(method):
    vit = tiny_vit(pos_embed="learn")
    ours = VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                             pos_embed="learned")
    ours.load_state_dict(vit.state_dict())
    torch.manual_seed(1)
    on_timm = build(method, "micro", encoder=vit, backend="torch")
    on_ours = build(method, "micro", encoder=ours, backend="torch")
    on_ours.decoder.load_state_dict(on_timm.decoder.state_dict())
    if method == "sdae":
        on_ours.teacher.load_state_dict(on_timm.teacher.state_dict())
    imgs = torch.randn(4, 3, 32, 32)
    losses = []
    for model in (on_timm, on_ours):
        torch.manual_seed(5)
        loss = model(imgs)["loss"]
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], reduction=4 * 16 * 32, name="loss")
    for (name, p), q in zip(on_timm.encoder.named_parameters(), on_ours.encoder.parameters()):
        if p.requires_grad:
            assert_close(p.grad, q.grad, reduction=4 * 16 * 32, name=f"grad {name}")


def test_pretrain_exports_and_evaluates_a_timm_encoder(tmp_path):
    from sdae_fast.train.cli import make_args
    from sdae_fast.train.loop import pretrain

    def on_timm(method, size, img_size, patch_size, in_chans, backend=None, **method_kw):
        vit = tiny_vit(img_size=img_size, patch_size=patch_size, in_chans=in_chans)
        return build(method, size, encoder=vit, backend=backend, **method_kw)  # the demo's MAE options too

    args = make_args(method="mae", img_size=16, patch_size=4, batch_size=16, steps=3, lr=2e-3, out=str(tmp_path),
                     ckpt_every=0, knn=True, export=True, quiet=True, log_every=1000)
    res = pretrain(args, build_fn=on_timm)
    assert 0.0 <= res["knn_trained"] <= 1.0
    kw = json.load(open(tmp_path / "encoder.json"))
    theirs = timm.create_model("vit_base_patch16_224", pretrained=False, **kw).eval()
    theirs.load_state_dict(torch.load(tmp_path / "encoder.pt", weights_only=True), strict=True)
    encoder = res["model"].encoder.eval()
    x = torch.randn(2, kw["in_chans"], 16, 16)
    with torch.no_grad():
        assert_close(theirs(x), encoder.embed(x), reduction=32, name="exported encoder")


@pytest.mark.parametrize("kw,why", [(dict(reg_tokens=2), "register"), (dict(global_pool="avg"), "global_pool"),
                                    (dict(class_token=False, global_pool="avg"), "cls_token"),
                                    (dict(pos_drop_rate=0.1), "pos_drop_rate"), (dict(patch_drop_rate=0.5), "patch_drop"),
                                    (dict(dynamic_img_size=True), "dynamic_img_size")])
def test_unserved_timm_configs_are_refused(kw, why):
    with pytest.raises(ValueError, match=why):
        build("mae", "micro", encoder=tiny_vit(**kw))


def test_builtin_encoder_options_are_refused_with_an_encoder():
    with pytest.raises(ValueError, match="encoder's own configuration"):
        build("mae", "micro", encoder=tiny_vit(), drop_path_rate=0.1)


def test_topk_keeps_timm_proj_dropout_and_refuses_attention_dropout():
    # MixedAE's top-K blocks take over timm's attention layers: the output dropout stays with them;
    # attention dropout, which the top-K kernel does not apply, is refused rather than dropped.
    model = build("mixedae", "micro", encoder=tiny_vit(proj_drop_rate=0.1))
    attns = [blk.attn for blk in model.encoder.blocks]
    assert all(a.proj_drop.p == 0.1 for a in attns), [a.proj_drop for a in attns]
    with pytest.raises(ValueError, match="attn_drop_rate=0.1"):
        build("mixedae", "micro", encoder=tiny_vit(attn_drop_rate=0.1))
