"""Benchmark case for MixedAE's per-source gather out of the mixed encoder output (issue 12 §6):
the group's cls gathered as index 0 of every source ("repeated cls": every image takes the
gather's serial repeated-index backward) against :func:`sdae_fast.models.mixedae.own_tokens`
(cls copied apart, patches gathered without repeats). Forward + backward, fused backend; the
backward is ``torch.autograd.grad`` w.r.t. the latent (no accumulation into ``.grad``)."""
from __future__ import annotations

import os

import torch

from ..models.mixedae import own_tokens
from ..ops.masking import gather_tokens
from .harness import Case, register

R, PATCHES = 4, 196  # MixedAE's group size; 224 px / 16
BACKEND = "triton"  # the fused kernels; read at call time


def _repeated_cls(latent, ids_keep):
    cls_and_own = torch.cat([ids_keep.new_zeros(ids_keep.shape[0], 1), ids_keep + 1], dim=1)
    return gather_tokens(latent, cls_and_own, groups=R, backend=BACKEND)


def _make(fn, B, D, dtype, device):
    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        g = B // R
        ids = torch.stack([torch.randperm(PATCHES, generator=gen) for _ in range(g)]).reshape(B, PATCHES // R)
        latent = torch.randn(g, 1 + PATCHES, D, device=device, dtype=dtype).requires_grad_()
        ids = ids.to(device)
        grad = torch.randn_like(fn(latent, ids))
        return lambda: torch.autograd.grad(fn(latent, ids), latent, grad)

    return make


@register("mixedae_own")
def mixedae_own_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return []  # Triton runs on the CPU only in its interpreter
    if device != "cuda":
        shapes = [("tiny", 32, 8, torch.float32)]
    else:  # --quick: the smaller batch only
        shapes = [("ViT-B", 768, B, torch.bfloat16) for B in ((64,) if quick else (64, 256))]
    fns = {"repeated cls": _repeated_cls, "cls apart": lambda x, ids: own_tokens(x, ids, R, backend=BACKEND)}
    es = lambda dtype: torch.finfo(dtype).bits // 8  # noqa: E731
    out = []
    for model, D, B, dtype in shapes:
        rows = B * (1 + PATCHES // R)
        moved = 2 * rows * D * es(dtype) + 2 * (B // R) * (1 + PATCHES) * D * es(dtype)  # fwd + bwd floor
        for variant, fn in fns.items():
            out.append(Case("mixedae own tokens fwd+bwd", f"{model} B={B} {str(dtype).replace('torch.', '')}",
                            variant, _make(fn, B, D, dtype, device), bytes=moved, devices=(device,)))
    return out
