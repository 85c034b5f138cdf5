"""The compat entry points, swapped vs original: each case times the official path (the stand-ins
of :mod:`.official`, or the real timm class) and the sdae_fast drop-in on the same inputs.

CPU sizes are micro (the reference backend runs there, so the figures show the swaps' Python
overhead, not the kernels); GPU sizes are ViT-B/16 at 224 px and DINO's 65536-wide head (with
``--quick`` on the GPU: DINOLoss and mae.patch only).
"""
from __future__ import annotations

import copy
import importlib.util

import torch

from .harness import Case, register

HAS_TIMM = importlib.util.find_spec("timm") is not None


def _vit_cfg(device):
    if device == "cuda":
        return dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), 64, "ViT-B/16 B=64"
    return dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2), 16, "ViT-micro 32px/4 B=16"


def _dino_cases(device):
    from ..compat.dino import DINOLoss
    from .official import OfficialDINOLoss

    batch, ncrops, width = (64, 10, 65536) if device == "cuda" else (16, 4, 4096)
    shape = f"B={batch} crops={ncrops} K={width}"

    def make(variant):
        def build():
            args = (width, ncrops, 0.04, 0.07, 3, 10)
            crit = (OfficialDINOLoss(*args, dtype=torch.float32, device=device) if variant == "original"
                    else DINOLoss(*args).to(device))
            student = torch.randn(ncrops * batch, width, device=device, requires_grad=True)
            teacher = torch.randn(2 * batch, width, device=device)

            def run():
                crit(student, teacher, 1).backward()
            return run
        return build

    return [Case("compat DINOLoss fwd+bwd", shape, v, make(v), devices=(device,)) for v in ("original", "swapped")]


def _mae_cases(device):
    from ..compat import mae as compat_mae
    from .official import OfficialMAE

    cfg, batch, shape = _vit_cfg(device)
    dec = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16) if device == "cuda" else \
        dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)

    def make(variant):
        def build():
            model = OfficialMAE(**cfg, **dec, mlp_ratio=4.0, norm_pix_loss=True).to(device)
            if variant == "swapped":
                compat_mae.patch(model)
            imgs = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=device)

            def run():
                model(imgs)[0].backward()
            return run
        return build

    return [Case("compat mae.patch train step", shape, v, make(v), devices=(device,)) for v in ("original", "swapped")]


def _sdae_ema_cases(device):
    from timm.models.vision_transformer import VisionTransformer

    from ..compat.sdae import EMA_process
    from .official import OfficialSdAEStudent, official_ema_process

    cfg, _, shape = _vit_cfg(device)

    def make(variant):
        def build():
            student = OfficialSdAEStudent(**cfg, mlp_ratio=4.0).to(device)
            teacher = VisionTransformer(**cfg, num_classes=0).to(device)
            schedule = [0.96, 0.99]
            if variant == "original":
                return lambda: official_ema_process(student, teacher, schedule[0])
            return lambda: EMA_process(student, None, teacher, 0, schedule)
        return build

    return [Case("compat SdAE EMA_process", shape.split(" B=")[0], v, make(v), devices=(device,))
            for v in ("original", "swapped")]


def _timm_lightly_cases(device):
    import timm
    from timm.utils.model_ema import ModelEmaV3 as TimmModelEmaV3

    from ..compat.lightly import update_momentum
    from ..compat.timm import ModelEmaV3
    from .official import lightly_update_momentum

    cfg, _, shape = _vit_cfg(device)
    shape = shape.split(" B=")[0]

    def model():
        return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **cfg).to(device)

    def ema_case(variant):
        def build():
            m = model()
            ema = (TimmModelEmaV3 if variant == "original" else ModelEmaV3)(m, decay=0.999)
            return lambda: ema.update(m, step=10)
        return build

    def momentum_case(variant):
        def build():
            m = model()
            ema = copy.deepcopy(m)
            fn = lightly_update_momentum if variant == "original" else update_momentum
            return lambda: fn(m, ema, 0.996)
        return build

    return ([Case("compat timm ModelEmaV3.update", shape, v, ema_case(v), devices=(device,))
             for v in ("original", "swapped")]
            + [Case("compat lightly update_momentum", shape, v, momentum_case(v), devices=(device,))
               for v in ("original", "swapped")])


def _encoder_cases(device):
    import timm

    from ..models import build

    cfg, batch, shape = _vit_cfg(device)
    size = "base" if device == "cuda" else "micro"

    def make(variant):
        def build_case():
            if variant == "built-in ViT":
                model = build("mae", size, **{k: cfg[k] for k in ("img_size", "patch_size")}, in_chans=3,
                              embed_dim=cfg["embed_dim"], depth=cfg["depth"], num_heads=cfg["num_heads"])
            else:
                vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **cfg)
                model = build("mae", size, encoder=vit)
            model = model.to(device)
            imgs = torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], device=device)

            def run():
                model(imgs)["loss"].backward()
            return run
        return build_case

    return [Case("compat build(mae, encoder=) train step", shape, v, make(v), devices=(device,))
            for v in ("built-in ViT", "timm encoder")]


@register("compat")
def compat_cases(device: str, quick: bool) -> list[Case]:
    """Every swap; on CUDA with ``quick`` only DINOLoss and mae.patch (the CPU's micro sizes are cheap)."""
    cases = _dino_cases(device)
    if HAS_TIMM:  # the official MAE and SdAE teacher are timm models; the other two compare with timm itself
        cases += _mae_cases(device)
        if not (quick and device == "cuda"):
            cases += _sdae_ema_cases(device) + _timm_lightly_cases(device) + _encoder_cases(device)
    for case in cases:
        case.slow = True  # whole models: after the op cases under a time budget
    return cases
