"""compat.mae.patch on one instance of (a stand-in for) the official MAE / SdAE-student classes:
under the same seed the patched instance gives the unpatched one's loss, prediction, mask and
gradients; other instances and the class stay untouched; patch / unpatch / patch again; .to(),
torch.compile (both orders). DDP: tests/test_compat_ddp.py."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("timm")  # the official MAE builds on timm's Block and PatchEmbed

from sdae_fast.bench.official import OfficialMAE, OfficialSdAEStudent  # noqa: E402
from sdae_fast.compat import mae as compat_mae  # noqa: E402
from sdae_fast.testing import assert_close  # noqa: E402

BATCH, TOKENS = 3, 16


def run(model, imgs, seed=7):
    """One official step: forward under a fixed seed, backward of the loss (SdAE: of a stand-in loss)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(imgs)
    if isinstance(model, OfficialSdAEStudent) or isinstance(getattr(model, "_orig_mod", None), OfficialSdAEStudent):
        pred, mask, unkeep = out
        loss = (pred * torch.linspace(-1, 1, pred.shape[-1])).sum()  # every prediction gets a gradient
        out = (loss, pred, mask, unkeep)
    out[0].backward()
    grads = {n: p.grad.clone() for n, p in compat_mae.target(model).named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


def assert_same_step(got, want):
    (outs, grads), (ref_outs, ref_grads) = got, want
    assert_close(outs[0], ref_outs[0], dtype=torch.float32, reduction=BATCH * TOKENS * 48, name="loss")
    assert_close(outs[1], ref_outs[1], dtype=torch.float32, reduction=TOKENS, name="pred")
    assert torch.equal(outs[2], ref_outs[2]) and outs[2].dtype == ref_outs[2].dtype, "mask"
    for extra, ref_extra in zip(outs[3:], ref_outs[3:]):
        assert torch.equal(extra, ref_extra), "ids_unkeep"
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert_close(grads[name], ref_grads[name], dtype=torch.float32, reduction=BATCH * TOKENS, name=f"grad {name}")


def twins(cls, **kw):
    torch.manual_seed(0)
    a = cls(**kw)
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cls,norm_pix", [(OfficialMAE, True), (OfficialMAE, False), (OfficialSdAEStudent, False)])
def test_patched_equals_unpatched(cls, norm_pix, backend):
    official, fused = twins(cls, norm_pix_loss=norm_pix)
    compat_mae.patch(fused, backend=backend)
    assert compat_mae.patched_parts(fused) == ("masking", "unshuffle", "loss")
    imgs = torch.randn(BATCH, 3, 16, 16)
    assert_same_step(run(fused, imgs), run(official, imgs))


def test_patched_equals_unpatched_under_bf16_autocast():
    # The official code adds fp32 position tables to the half-precision patch/decoder tokens, which
    # promotes them to fp32; the patch does the same before the fused ops.
    official, fused = twins(OfficialMAE, norm_pix_loss=True)
    compat_mae.patch(fused)
    imgs = torch.randn(BATCH, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = run(fused, imgs), run(official, imgs)
    assert got[0][1].dtype == want[0][1].dtype == torch.bfloat16
    assert_same_step(got, want)


def test_forward_loss_matches_float64_official():
    model = OfficialMAE(norm_pix_loss=True)
    imgs, pred = torch.randn(BATCH, 3, 16, 16), torch.randn(BATCH, TOKENS, 48, requires_grad=True)
    mask = (torch.rand(BATCH, TOKENS) < 0.75).float()
    mask[:, 0] = 1
    want = model.forward_loss(imgs.double(), pred.double(), mask.double())  # the class method, in float64
    compat_mae.patch(model)
    assert_close(model.forward_loss(imgs, pred, mask), want, dtype=torch.float32, reduction=BATCH * TOKENS * 48)


@pytest.mark.parametrize("flags", [dict(masking=True, unshuffle=False, loss=False),
                                   dict(masking=False, unshuffle=True, loss=False),
                                   dict(masking=False, unshuffle=False, loss=True)], ids=str)
def test_each_part_alone(flags):
    official, fused = twins(OfficialMAE, norm_pix_loss=True)
    compat_mae.patch(fused, **flags)
    assert compat_mae.patched_parts(fused) == tuple(k for k, v in flags.items() if v)
    imgs = torch.randn(BATCH, 3, 16, 16)
    assert_same_step(run(fused, imgs), run(official, imgs))


def test_one_instance_patched_others_and_class_untouched():
    a, b = twins(OfficialMAE)
    teacher = copy.deepcopy(a)
    class_methods = {name: OfficialMAE.__dict__[name] for name in compat_mae.PARTS.values()}
    compat_mae.patch(a)
    for name, fn in class_methods.items():
        assert OfficialMAE.__dict__[name] is fn
        assert getattr(b, name).__func__ is fn and getattr(teacher, name).__func__ is fn
        assert getattr(a, name).func is compat_mae._METHODS[name] and getattr(a, name).args == (a,)
    assert compat_mae.patched_parts(b) == () and compat_mae.patched_parts(teacher) == ()
    assert a.state_dict().keys() == b.state_dict().keys()


def test_deep_copy_and_pickle_keep_the_patch(tmp_path):
    official, model = twins(OfficialMAE, norm_pix_loss=True)
    compat_mae.patch(model, unshuffle=False)
    torch.save(model, tmp_path / "whole.pt")
    imgs = torch.randn(BATCH, 3, 16, 16)
    want = run(official, imgs)
    for other in (copy.deepcopy(model), torch.load(tmp_path / "whole.pt", weights_only=False)):
        assert compat_mae.patched_parts(other) == ("masking", "loss")
        assert other.forward_encoder.args[0] is other  # bound to the copy, not to the original
        assert_same_step(run(other, imgs), want)


def test_patch_unpatch_patch_again():
    official, model = twins(OfficialMAE, norm_pix_loss=True)
    imgs = torch.randn(BATCH, 3, 16, 16)
    want = run(official, imgs)
    compat_mae.patch(model)
    assert_same_step(run(model, imgs), want)
    compat_mae.unpatch(model)
    assert compat_mae.patched_parts(model) == ()
    assert all(name not in model.__dict__ for name in compat_mae.PARTS.values())
    assert_same_step(run(model, imgs), want)
    compat_mae.patch(model, loss=False)
    compat_mae.patch(model)  # re-patching replaces the first patch
    assert compat_mae.patched_parts(model) == ("masking", "unshuffle", "loss")
    assert_same_step(run(model, imgs), want)
    compat_mae.unpatch(compat_mae.unpatch(model))  # unpatching twice is harmless


@pytest.mark.parametrize("order", ["patch-then-to", "to-then-patch"])
def test_patch_and_to_in_either_order(order):
    official, model = twins(OfficialMAE)
    if order == "patch-then-to":
        model = compat_mae.patch(model).to(torch.float32).to("cpu")
    else:
        model = compat_mae.patch(model.to(torch.float32).to("cpu"))
    imgs = torch.randn(BATCH, 3, 16, 16)
    assert_same_step(run(model, imgs), run(official, imgs))


def test_detects_by_attributes_not_import_path():
    class Renamed(OfficialMAE):  # another name, another module: still recognised
        pass

    assert compat_mae.is_masked_autoencoder(Renamed())
    with pytest.raises(TypeError, match="missing"):
        compat_mae.patch(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("order", ["patch-then-compile", "compile-run-then-patch"])
def test_torch_compile_either_order(order):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    official, model = twins(OfficialMAE, norm_pix_loss=True)
    imgs = torch.randn(BATCH, 3, 16, 16)
    want = run(official, imgs)
    counter = CompileCounter()
    if order == "patch-then-compile":
        compiled = torch.compile(compat_mae.patch(model), backend=counter)
    else:
        compiled = torch.compile(model, backend=counter)
        assert_same_step(run(compiled, imgs), want)
        before = counter.frame_count
        compat_mae.patch(compiled)  # looks through the OptimizedModule
        assert compat_mae.patched_parts(model) == ("masking", "unshuffle", "loss")
    got = run(compiled, imgs)
    assert_same_step(got, want)
    if order != "patch-then-compile":
        assert counter.frame_count > before, "the compiled model kept running the unpatched graph"


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["patch-then-cuda", "cuda-then-patch"])
def test_patch_and_cuda_in_either_order(order):
    official, model = twins(OfficialMAE, norm_pix_loss=True)
    official, model = official.cuda(), (compat_mae.patch(model).cuda() if order == "patch-then-cuda"
                                        else compat_mae.patch(model.cuda()))
    imgs = torch.randn(BATCH, 3, 16, 16, device="cuda")
    assert_same_step(run(model, imgs), run(official, imgs))


class KeepsFirstPatches(OfficialMAE):
    """A subclass with masking of its own: the first patches are kept, no noise drawn."""

    def random_masking(self, x, mask_ratio):
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        ids_shuffle = torch.arange(length).repeat(n, 1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        return x[:, :keep], mask, ids_restore


class ScalesItsInput(OfficialMAE):
    def forward_encoder(self, x, mask_ratio):
        return super().forward_encoder(2 * x, mask_ratio)


@pytest.mark.parametrize("cls,part", [(KeepsFirstPatches, "masking"), (ScalesItsInput, "masking")])
def test_a_subclass_of_its_own_is_refused_not_replaced(cls, part):
    torch.manual_seed(0)
    model = cls()
    with pytest.raises(TypeError, match=f"forward_encoder does not give what the fused {part} gives"):
        compat_mae.patch(model)
    assert compat_mae.patched_parts(model) == ()  # left as it was
    compat_mae.patch(model, masking=False)  # the parts that are official still patch
    assert compat_mae.patched_parts(model) == ("unshuffle", "loss")


@pytest.mark.parametrize("norm_pix", [True, False])
def test_images_that_require_grad_get_the_official_gradient(norm_pix):
    official, fused = twins(OfficialMAE, norm_pix_loss=norm_pix)
    compat_mae.patch(fused)
    grads = []
    for model in (official, fused):
        imgs = torch.randn(BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(1)).requires_grad_()
        torch.manual_seed(7)
        model(imgs)[0].backward()
        grads.append(imgs.grad)
    assert_close(grads[1], grads[0], dtype=torch.float32, reduction=BATCH * TOKENS * 48, name="d loss / d imgs")
