"""Benchmark cases for SdAE's cosine loss and MAE's masked pixel loss (SPEC §4), forward + backward.

Variants: "fused" (the public op with backend="triton"), "naive" (the plain-PyTorch reference,
i.e. SdAE's / MAE's official formulas), "compile(reference)" (torch.compile of the reference,
dynamic=False, built anew per case; GPU only). Each call is the loss and ``torch.autograd.grad`` of
it w.r.t. pred (no accumulation into ``.grad``, which would add passes that belong to no variant).

``bytes`` is the floor: the cosine loss reads pred and target once and writes grad once; the masked
MSE must read pred and target only on masked patches (MAE masks 75% of them), reads the mask, and
writes the full grad (zeros on visible patches included).
"""
from __future__ import annotations

import os

import torch

from .. import reference
from ..ops.cosine_loss import cosine_loss
from ..ops.masked_mse_loss import masked_mse_loss
from .harness import Case, Compiled, fresh, register

SDAE_FOLDS, SDAE_TOKENS, WIDTH = 3, 49, 768  # teacher folds per image, visible tokens, ViT-B width
MAE_PATCHES, MAE_PIXELS, MASK_RATIO = 196, 16 * 16 * 3, 0.75


def _fused_available(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _variants(device: str, reference_fn, fused_fn):
    fns = {"naive": reference_fn}
    if _fused_available(device):
        fns["fused"] = fused_fn
    if device == "cuda":
        fns["compile(reference)"] = Compiled(reference_fn)  # built per case (harness.fresh)
    return fns


def _loss_and_grad(loss_fn, pred, *rest, **kwargs):
    loss_fn = fresh(loss_fn)

    def step():
        loss = loss_fn(pred, *rest, **kwargs)
        return loss, torch.autograd.grad(loss, pred)[0]

    return step


def _cosine_cases(device, quick, dtype):
    if device != "cuda":
        shapes = [(SDAE_FOLDS * 2, 7, 32)]
    else:  # --quick: the smaller batch only
        shapes = [(SDAE_FOLDS * B, SDAE_TOKENS, WIDTH) for B in ((96,) if quick else (96, 256))]
    fns = _variants(device, reference.cosine_loss,
                    lambda p, t, **kw: cosine_loss(p, t, backend="triton", **kw))
    out = []
    for shape in shapes:
        numel = shape[0] * shape[1] * shape[2]
        for dim in (-1, 1):  # the paper reading, then the official token-axis cosine (features standardised)
            for variant, fn in fns.items():
                def make(fn=fn, shape=shape, dim=dim):
                    pred = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
                    target = torch.randn(shape, device=device, dtype=dtype)
                    return _loss_and_grad(fn, pred, target, dim=dim, standardize_target=True, standardize_dim=-1)

                out.append(Case(
                    op="cosine_loss fwd+bwd", shape=f"{'x'.join(map(str, shape))} dim={dim} {str(dtype)[6:]}",
                    variant=variant, make=make, bytes=3 * numel * dtype.itemsize,
                    flops=10 * numel, devices=(device,)))
    return out


def _mae_mask(B, device):
    """MAE's mask: exactly int(L · 0.75) random patches per image set to 1 (fp32, as in models_mae)."""
    removed = int(MAE_PATCHES * MASK_RATIO)
    ranks = torch.rand(B, MAE_PATCHES, device=device).argsort(dim=1).argsort(dim=1)
    return (ranks < removed).float()


def _masked_mse_cases(device, quick, dtype):
    shapes = [(2, 16, 48)] if device != "cuda" else [(256, MAE_PATCHES, MAE_PIXELS)]
    fns = _variants(device, reference.masked_mse_loss,
                    lambda p, t, m, **kw: masked_mse_loss(p, t, m, backend="triton", **kw))
    out = []
    for B, L, P in shapes:
        masked_rows = int(L * MASK_RATIO) * B
        floor = 2 * masked_rows * P * dtype.itemsize + B * L * 4 + B * L * P * dtype.itemsize
        for variant, fn in fns.items():
            def make(fn=fn, B=B, L=L, P=P):
                pred = torch.randn(B, L, P, device=device, dtype=dtype, requires_grad=True)
                target = torch.rand(B, L, P, device=device, dtype=dtype)
                mask = _mae_mask(B, device) if L == MAE_PATCHES else (torch.rand(B, L, device=device) < MASK_RATIO).float()
                return _loss_and_grad(fn, pred, target, mask, norm_target=True)

            out.append(Case(
                op="masked_mse_loss fwd+bwd", shape=f"{B}x{L}x{P} mask={MASK_RATIO} {str(dtype)[6:]}",
                variant=variant, make=make, bytes=floor, flops=8 * masked_rows * P, devices=(device,)))
    return out


@register("losses_cosine_mse")
def loss_cases(device: str, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return _cosine_cases(device, quick, dtype) + _masked_mse_cases(device, quick, dtype)
