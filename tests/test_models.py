"""The model layer (SPEC §6): ViT naming and numerics, the four methods' mechanics, the training
contract, and backend agreement (torch reference vs Triton ops on the same weights and RNG)."""
import copy
import math

import pytest
import torch

import sdae_fast
from sdae_fast.dispatch import OPS
from sdae_fast.data import model_input
from sdae_fast.models import MODELS, VisionTransformer, build, create_model, set_backend
from sdae_fast.models.vit import get_2d_sincos_pos_embed
from sdae_fast.testing import assert_close

METHODS = ["mae", "sdae", "mixedae", "dino"]
BATCH = 4  # divisible by MixedAE's group size


def images(batch=BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, 32, 32, generator=g)


def run_step(model, imgs, seed):
    """Forward + backward from a fixed RNG state; returns (out dict, {name: grad})."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out = model(model_input(model, imgs))
    out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return out, grads


# ------------------------------------------------------------------------------------------
# ViT: timm naming, sincos table, interpolation.
# ------------------------------------------------------------------------------------------
TIMM_KEYS_DEPTH1 = [
    "cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
    "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
    "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
    "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
    "norm.weight", "norm.bias",
]


def tiny_vit(**kw):
    return VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=1, num_heads=2, **kw)


@pytest.mark.parametrize("topk", [None, 0.25])
def test_vit_state_dict_keys_match_timm(topk):
    # timm 1.0 VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=1, num_heads=2,
    # num_classes=0).state_dict().keys(), in order; a TopKAttention block keeps the names.
    assert list(tiny_vit(topk=topk).state_dict()) == TIMM_KEYS_DEPTH1
    assert tiny_vit().state_dict()["pos_embed"].shape == (1, 65, 64)


def test_vit_loads_into_timm_and_agrees():
    import timm.models.vision_transformer as vit_mod  # in the test extras: this test must not skip

    ours = VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2)
    theirs = vit_mod.VisionTransformer(img_size=32, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=2,
                                       num_classes=0, global_pool="token", class_token=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = images(3)
    assert_close(ours.embed(x), theirs.eval()(x), reduction=64 * 65)


def mae_numpy_sincos(embed_dim, grid_size):
    """MAE's util/pos_embed.get_2d_sincos_pos_embed, transcribed with numpy semantics."""
    np = pytest.importorskip("numpy")

    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.meshgrid(np.arange(grid_size, dtype=np.float32), np.arange(grid_size, dtype=np.float32))
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_matches_mae():
    ours = get_2d_sincos_pos_embed(64, 8, cls_token=True)
    assert_close(ours, torch.from_numpy(mae_numpy_sincos(64, 8)), dtype=torch.float32)


def test_vit_other_resolution_and_patchify():
    vit = tiny_vit(pos_embed="learned")
    assert vit.forward_features(images(2)).shape == (2, 65, 64)
    assert vit.forward_features(torch.rand(2, 1, 16, 16)).shape == (2, 17, 64)  # DINO local crop
    assert vit.embed(images(2)).shape == (2, 64)
    assert torch.equal(vit.pos_embed_for((8, 8)), vit.pos_embed[0])
    x = images(2)
    patches = vit.patchify(x)
    assert patches.shape == (2, 64, 16)
    assert torch.equal(patches[0, 9], x[0, 0, 4:8, 4:8].reshape(-1))  # row 1, column 1
    assert torch.equal(vit.unpatchify(patches), x)


def test_attn_impl_errors():
    with pytest.raises(ValueError, match="unknown attn_impl"):
        tiny_vit(attn_impl="nope")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs xformers"):
            tiny_vit(attn_impl="xformers").embed(images(1))


# ------------------------------------------------------------------------------------------
# Method mechanics.
# ------------------------------------------------------------------------------------------
def test_mixedae_mixing_is_a_partition_and_builds_the_mixed_input():
    model = build("mixedae", "micro", backend="torch")
    r, length = 4, 64
    labels, ids_keep, ids_restore, mask = model.mixing(2, length, "cpu")
    for gi in range(2):
        assert torch.bincount(labels[gi], minlength=r).tolist() == [length // r] * r  # N/r patches each
        for s in range(r):
            b = gi * r + s
            own = ids_keep[b]
            assert (labels[gi, own] == s).all()
            assert torch.equal(mask[b], (labels[gi] != s).float())
            # ids_restore sends source b's own positions to the first N/r slots, in ids_keep order.
            assert torch.equal(ids_restore[b, own], torch.arange(length // r))
            assert sorted(ids_restore[b].tolist()) == list(range(length))
    # The mixed sequence: position i holds source labels[i]'s patch i + pos[i] + segment[labels[i]].
    imgs = images(4)
    enc = model.encoder
    tokens = enc.patch_tokens(imgs)
    pos = enc.pos_embed[0]
    stacked = (pos[1:][None] + model.segment_embed[:, None]).reshape(r * length, -1)
    index = labels[:1] * length + torch.arange(length)
    mixed = sdae_fast.gather_tokens(tokens.reshape(1, r * length, -1), index, pos_embed=stacked,
                                    prefix=enc.cls_prefix(pos))
    i = 5
    s = int(labels[0, i])
    assert_close(mixed[0, 1 + i], tokens[s, i] + pos[1 + i] + model.segment_embed[s])


def test_mixedae_needs_batch_divisible_by_group():
    model = build("mixedae", "micro")
    with pytest.raises(ValueError, match="divisible by 4"):
        model(images(3))


def test_sdae_folds_partition_the_masked_tokens():
    model = build("sdae", "micro", backend="torch")
    assert model.fold_size == 16  # 64 patches, 16 kept, 48 masked in 3 folds
    seen = {}

    def spy(imgs, folds):
        seen["folds"] = folds
        return orig(imgs, folds)

    orig, model.teacher_targets = model.teacher_targets, spy
    torch.manual_seed(3)
    model(images())
    torch.manual_seed(3)
    m = sdae_fast.random_masking(BATCH, 64, 0.75)
    folds = seen["folds"].reshape(BATCH, -1)
    assert torch.equal(folds.sort(1).values, m.ids_masked.sort(1).values)  # disjoint and complete


def test_dino_takes_crops_not_images():
    model = build("dino", "micro")
    assert (model.global_size, model.local_size, model.num_local) == (32, 16, 2)
    with pytest.raises(TypeError, match="one tensor per resolution"):
        model(images())


def test_dino_teacher_temp_warmup_and_center():
    model = build("dino", "micro", teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3)
    model.set_schedule(100, 10)
    assert model.current_teacher_temp() == pytest.approx(0.04)
    model.step = 10
    assert model.current_teacher_temp() == pytest.approx(0.055)
    model.step = 30
    assert model.current_teacher_temp() == pytest.approx(0.07)
    center = model.center.clone()
    model(model_input(model, images()))
    assert not torch.equal(center, model.center)  # updated in place in training mode
    model.eval()
    center = model.center.clone()
    model(model_input(model, images()))
    assert torch.equal(center, model.center)


# ------------------------------------------------------------------------------------------
# The training contract.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_contract_and_torch_determinism(method):
    model = build(method, "micro", backend="torch")
    model.set_schedule(20, 5)
    imgs = images()
    state = copy.deepcopy(model.state_dict())
    out1, g1 = run_step(model, imgs, seed=7)
    model.load_state_dict(state)  # DINO's centre moved during the forward
    out2, g2 = run_step(model, imgs, seed=7)
    loss = out1["loss"]
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
    assert all(v.dim() == 0 for v in out1.values())
    assert torch.equal(out1["loss"], out2["loss"])
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(g1) and all(torch.isfinite(g).all() for g in g1.values())
    assert not any(n.startswith("teacher.") for n in trainable)
    assert "encoder.pos_embed" not in trainable or method == "dino"  # MAE's sincos table is fixed
    assert model.encoder.embed(imgs).shape == (BATCH, 64)
    model.after_step()


@pytest.mark.parametrize("method", ["sdae", "dino"])
def test_a_deep_copy_updates_its_own_teacher(method):
    """copy.deepcopy (timm's ModelEmaV3, a user's snapshot) of a model whose EMA is built: the copy's
    update moves the copy's teacher, as the original's would (the EMA's pairs were copied away from
    the copy's parameters, so its teacher stayed put), and leaves the original alone."""
    import pickle

    model = build(method, "micro", backend="torch")
    model.set_schedule(20, 1)
    model.momentum()  # the EMA is built: it holds views of model's parameters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("teacher."):
                p.add_(1.0)  # the student runs ahead of the teacher
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        twin = copy.deepcopy(model)  # the update the copy must make, on a model of its own
        twin._ema = None
        original = copy.deepcopy(model.teacher.state_dict())
        copied.after_step(), twin.after_step()
        assert copied.step == twin.step == model.step + 1
        for k, v in copied.teacher.state_dict().items():
            assert torch.equal(v, twin.teacher.state_dict()[k]), k
        assert any(not torch.equal(v, original[k]) for k, v in copied.teacher.state_dict().items())
        assert all(torch.equal(v, original[k]) for k, v in model.teacher.state_dict().items())


@pytest.mark.parametrize("method", ["sdae", "dino"])
def test_teacher_ema_and_exact_resume(method):
    imgs = images()
    model = build(method, "micro", backend="torch")
    spe = 1 if method == "sdae" else 5  # SdAE updates at the end of each epoch: make every step one
    model.set_schedule(20, spe)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    teacher0 = copy.deepcopy(model.teacher.state_dict())
    for i in range(2):
        run_step(model, imgs, seed=i)
        opt.step()
        model.after_step()
    moved = [k for k, v in model.teacher.state_dict().items() if not torch.equal(v, teacher0[k])]
    assert moved, "the teacher did not follow the student"
    # EMA of the student: after the update, teacher = m·teacher_old + (1 - m)·student for a parameter.
    m = model.momentum()
    t_old = model.teacher["encoder"].norm.weight.clone()
    run_step(model, imgs, seed=5)
    opt.step()
    model.after_step()
    expected = m * t_old + (1 - m) * model.encoder.norm.weight
    assert_close(model.teacher["encoder"].norm.weight, expected)

    # Resume: a fresh model loading the state_dict continues identically (teacher, step, centre).
    state = copy.deepcopy(model.state_dict())
    torch.manual_seed(123)
    resumed = build(method, "micro", backend="torch")
    resumed.set_schedule(20, spe)
    resumed.load_state_dict(state)
    assert resumed.step == model.step == 3 and resumed.momentum() == model.momentum()
    a, _ = run_step(model, imgs, seed=9)
    b, _ = run_step(resumed, imgs, seed=9)
    assert torch.equal(a["loss"], b["loss"])
    model.after_step()
    resumed.after_step()
    for k, v in model.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, resumed.state_dict()[k]), k


def test_factory_names():
    for name in ("mae_vit_base_patch16", "sdae_vit_base_patch16", "mixedae_vit_base_patch16",
                 "dino_vit_small_patch16", "mae_vit_micro_patch4", "dino_vit_micro_patch4"):
        assert name in MODELS
    from sdae_fast.models import mae_vit_micro_patch4, sdae_vit_base_patch16  # noqa: F401  (as the README shows)

    assert mae_vit_micro_patch4 is MODELS["mae_vit_micro_patch4"]
    model = create_model("sdae_vit_micro_patch4", backend="torch", decoder_depth=2)
    assert len(model.decoder.blocks) == 2 and model.backend == "torch"
    with pytest.raises(ValueError, match="unknown method"):
        build("byol")
    with pytest.raises(ValueError, match="unknown size"):
        build("mae", "giant")


# ------------------------------------------------------------------------------------------
# Backends: the same weights through the reference ops and the Triton ops.
# ------------------------------------------------------------------------------------------
def missing_triton(model) -> list[str]:
    return [name for name in model.OPS_USED if "triton" not in OPS[name].impls]


@pytest.mark.parametrize("method", METHODS)
def test_triton_backend_matches_torch(method):
    torch.manual_seed(0)
    ref = build(method, "micro", backend="torch")
    missing = missing_triton(ref)
    if missing:
        pytest.skip(f"no triton implementation yet for {missing}")
    fused = build(method, "micro", backend="triton")
    fused.load_state_dict(ref.state_dict())
    device = sdae_fast.testing.triton_device()
    ref.to(device)
    fused.to(device)
    imgs = images().to(device)
    try:
        out_f, g_f = run_step(fused, imgs, seed=11)
    except sdae_fast.BackendUnavailable as e:
        pytest.skip(str(e))
    out_r, g_r = run_step(ref, imgs, seed=11)
    # Both run in fp32; the kernels differ from the reference only in the order of fp32 sums. The
    # longest sum behind any gradient element is over the batch's tokens times the width
    # (a weight gradient of the first layer), which bounds the reduction.
    tokens = 65 * (3 if method == "dino" else 1)
    reduction = BATCH * tokens * 64
    for key in out_r:
        assert_close(out_f[key], out_r[key], reduction=reduction, name=key)
    for n in g_r:
        assert_close(g_f[n], g_r[n], reduction=reduction, name=f"grad {n}")


def test_set_backend_reaches_every_module():
    model = build("mixedae", "micro", backend="torch")
    set_backend(model, "triton")
    backends = {m.backend for m in model.modules() if hasattr(m, "backend")}
    assert backends == {"triton"}
    assert math.isclose(model.encoder.blocks[0].attn.topk, 0.25)


@pytest.mark.parametrize("method", METHODS)
def test_every_op_call_carries_the_backend(method, monkeypatch):
    """The forward calls exactly the ops in OPS_USED (the triton skip relies on it), each with backend=."""
    calls = []
    original = sdae_fast.dispatch.Op.__call__

    def spy(self, *args, backend=None, **kwargs):
        calls.append((self.name, backend))
        return original(self, *args, backend=backend, **kwargs)

    monkeypatch.setattr(sdae_fast.dispatch.Op, "__call__", spy)
    model = build(method, "micro", backend="torch")
    model(model_input(model, images()))
    assert {name for name, _ in calls} == set(model.OPS_USED)
    assert {b for _, b in calls} == {"torch"}
    calls.clear()
    model.set_schedule(10, 5)
    model.after_step()
    assert {b for _, b in calls} <= {"torch"}


@pytest.mark.parametrize("method, kw", [("sdae", dict(loss_dim=-1, ema_op="per_ite")),
                                        ("sdae", dict(shrink_num=None)), ("sdae", dict(shrink_num=40)),
                                        ("sdae", dict(num_folds=None, shrink_num=20, teacher_init="student")),
                                        ("mixedae", dict(contrastive_weight=0.0)),
                                        ("mae", dict(norm_pix_loss=False, mask_ratio=0.5))])
def test_method_options(method, kw):
    model = build(method, "micro", backend="torch", **kw)
    model.set_schedule(10, 5)
    out, grads = run_step(model, images(), seed=2)
    assert torch.isfinite(out["loss"]) and grads
    teacher0 = copy.deepcopy(model.teacher.state_dict()) if hasattr(model, "teacher") else None
    model.after_step()
    if kw.get("ema_op") == "per_ite":  # updated after the first iteration, with epoch 0's momentum
        assert model.momentum() == pytest.approx(0.96)
        assert any(not torch.equal(v, teacher0[k]) for k, v in model.teacher.state_dict().items())


@pytest.mark.parametrize("method,kw,message", [
    ("mae", dict(mask_ratio=0.0), "MAE: mask_ratio 0.0 masks none of the 64 patches"),
    ("mae", dict(mask_ratio=1.0), "MAE: mask_ratio must be a finite float in \\[0, 1\\)"),
    ("mae", dict(decoder_depth=-1), "decoder_depth must be an int >= 0, got -1"),
    ("sdae", dict(num_folds=0), "SdAE: num_folds must be an int >= 1, got 0"),
    ("sdae", dict(num_folds=48), "SdAE: loss_dim=1 takes the cosine over each fold's tokens"),
    ("mixedae", dict(group_size=0), "MixedAE: group_size must be an int >= 2, got 0"),
    ("mae", dict(drop_path_rate=1.0), "drop_path_rate must be a finite float in \\[0, 1\\), got 1.0"),
    ("dino", dict(local_size=2), "DINO: local_size must be an int >= 4, got 2"),
    ("dino", dict(num_local=-1), "DINO: num_local must be an int >= 0, got -1"),
])
def test_configurations_that_cannot_train_are_refused_at_build(method, kw, message):
    """Each of these built, then gave NaN (MAE with nothing masked: 0 / 0, and NaN parameters after
    one fused step), nonsense (drop-path masks of -1 past rate 1) or a bare ZeroDivisionError or
    interpolate error at the first step."""
    with pytest.raises(ValueError, match=message):
        build(method, "micro", **kw)


@pytest.mark.parametrize("method", ["mae", "sdae", "mixedae"])
def test_masked_methods_refuse_images_of_another_size(method):
    """Their position table, masks and decoder are the built size's: 32x48 images failed deep inside
    (MixedAE: a reshape of mismatched sizes; MAE/SdAE: an add of mismatched tables)."""
    model = build(method, "micro")
    with pytest.raises(ValueError, match=r"the images are 32x48 px, the model is built for 32x32 \(img_size\)"):
        model(torch.randn(4, 1, 32, 48))
