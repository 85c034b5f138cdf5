"""Benchmark cases: DINO's loss and MixedAE's homologous contrastive loss, forward + backward.

Variants: "fused" (the Triton kernels through the public op), "naive" (the reference),
"compile(reference)" (torch.compile of the reference, dynamic=False, built anew per case; GPU
only). On the CPU (quick) the shapes are tiny and "fused" runs only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os

import torch

from .. import reference
from ..ops.contrastive_loss import homologous_contrastive_loss
from ..ops.dino_loss import dino_loss
from .harness import Case, compile_fresh, register


def _fused_devices():
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET", "0") == "1" else ("cuda",)


def _dino_make(variant, views, glob, batch, width, dtype, device):
    def make():
        student = torch.randn(views * batch, width, device=device, dtype=dtype, requires_grad=True)
        teacher = torch.randn(glob * batch, width, device=device, dtype=dtype)
        center = torch.zeros(1, width, device=device, dtype=torch.float32)
        if variant == "compile(reference)":
            loss_fn = compile_fresh(reference.dino_loss)
        else:
            backend = "triton" if variant == "fused" else "torch"

            def loss_fn(*a, **k):
                return dino_loss(*a, backend=backend, **k)

        def step():
            student.grad = None
            loss = loss_fn(student, teacher, center, num_global=glob, update_center=True)
            loss.backward()
            return loss

        return step

    return make


def _contrastive_make(variant, images, tokens, width, sources, dtype, device):
    def make():
        z = torch.randn(images, tokens, width, device=device, dtype=dtype, requires_grad=True)
        labels = torch.randint(0, sources, (images, tokens), device=device)
        if variant == "compile(reference)":
            loss_fn = compile_fresh(reference.homologous_contrastive_loss)
        else:
            backend = "triton" if variant == "fused" else "torch"

            def loss_fn(*a, **k):
                return homologous_contrastive_loss(*a, backend=backend, **k)

        def step():
            z.grad = None
            loss = loss_fn(z, labels, temperature=0.07, normalize=True)
            loss.backward()
            return loss

        return step

    return make


def _variants():
    return [("fused", _fused_devices()), ("naive", ("cuda", "cpu")), ("compile(reference)", ("cuda",))]


@register("losses_dino_contrastive")
def dino_contrastive_cases(device: str, quick: bool) -> list[Case]:
    out = []
    if device != "cuda":
        dino_shapes = [(4, 2, 2, 512, torch.float32)]
        con_shapes = [(2, 20, 32, 2, torch.float32)]
    else:
        dino_shapes = [(10, 2, 64, 65536, torch.bfloat16)]  # 2 global + 8 local crops, head width 65536
        con_shapes = [(64, 196, 768, 4, torch.bfloat16), (128, 196, 768, 4, torch.bfloat16)][:1 if quick else 2]
    for views, glob, batch, width, dtype in dino_shapes:
        size = torch.finfo(dtype).bits // 8
        # Floor: read student and teacher once, write the student gradient once (+ the fp32 centre).
        nbytes = (2 * views + glob) * batch * width * size + 2 * width * 4
        shape = f"V={views} G={glob} B={batch} K={width} {str(dtype).replace('torch.', '')}"
        for variant, devices in _variants():
            out.append(Case("dino_loss fwd+bwd", shape, variant,
                            _dino_make(variant, views, glob, batch, width, dtype, device),
                            bytes=nbytes, devices=devices))
    for images, tokens, width, sources, dtype in con_shapes:
        size = torch.finfo(dtype).bits // 8
        nbytes = 2 * images * tokens * width * size + images * tokens * 8  # z in, dz out, labels
        flops = 4 * images * tokens * tokens * width  # z·zᵀ forward, dsim·z backward
        shape = f"M={images} N={tokens} D={width} {str(dtype).replace('torch.', '')}"
        for variant, devices in _variants():
            out.append(Case("homologous_contrastive_loss fwd+bwd", shape, variant,
                            _contrastive_make(variant, images, tokens, width, sources, dtype, device),
                            bytes=nbytes, flops=flops, devices=devices))
    return out
