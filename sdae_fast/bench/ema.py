"""EMA teacher update: fused (Triton, CUDA) vs DINO's per-parameter loop vs torch._foreach_lerp_."""
from __future__ import annotations

import os

import torch

import sdae_fast
from .harness import Case, register


def vit_shapes(dim: int, depth: int, patch: int = 16, tokens: int = 197, in_chans: int = 3) -> list[tuple]:
    """timm ViT parameter shapes: 4 + 12·depth + 2 tensors (150 for ViT-B, 294 for ViT-L)."""
    shapes = [(dim, in_chans, patch, patch), (dim,), (1, 1, dim), (1, tokens, dim)]
    for _ in range(depth):
        shapes += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,),
                   (4 * dim, dim), (4 * dim,), (dim, 4 * dim), (dim,)]
    return shapes + [(dim,), (dim,)]


def dino_head_shapes(dim: int, out_dim: int = 65536, hidden: int = 2048, bottleneck: int = 256) -> list[tuple]:
    """DINO head: 3-layer MLP + weight-normalised last layer (weight_g, weight_v): 8 tensors."""
    return [(hidden, dim), (hidden,), (hidden, hidden), (hidden,), (bottleneck, hidden), (bottleneck,),
            (out_dim, 1), (out_dim, bottleneck)]


MODELS = {
    "ViT-S+DINO head": vit_shapes(384, 12) + dino_head_shapes(384),  # 158 tensors, ~43M values
    "ViT-B": vit_shapes(768, 12),  # 150 tensors, ~86M
    "ViT-L": vit_shapes(1024, 24),  # 294 tensors, ~304M
}


def _make(shapes, t_dtype, device, variant):
    def make():
        student = [torch.randn(s, device=device) for s in shapes]
        teacher = [torch.randn(s, device=device).to(t_dtype) for s in shapes]
        m = 0.996
        if variant == "naive":
            def run():
                with torch.no_grad():
                    for t, s in zip(teacher, student):  # DINO's update loop
                        t.mul_(m).add_((1 - m) * s.detach())
        elif variant == "_foreach_lerp_":
            def run():
                with torch.no_grad():
                    torch._foreach_lerp_(teacher, student, 1 - m)
        else:
            backend = {"fused": "triton", "fused-cuda": "cuda"}[variant]

            def run():
                sdae_fast.ema_update_(teacher, student, m, backend=backend)
        return run

    return make


@register("ema")
def ema_cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        models = {"ViT-micro": vit_shapes(64, 2, patch=4, tokens=65, in_chans=1)}
        dtypes = [torch.float32]
    elif quick:  # one real model, fp32 teacher
        models, dtypes = {"ViT-B": MODELS["ViT-B"]}, [torch.float32]
    else:
        models, dtypes = MODELS, [torch.float32, torch.bfloat16]
    variants = ["naive", "_foreach_lerp_"]
    if device == "cuda":
        variants += ["fused", "fused-cuda"]
    elif os.environ.get("TRITON_INTERPRET") == "1":
        variants += ["fused"]
    cases = []
    for name, shapes in models.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        for t_dtype in dtypes:
            t_size = torch.tensor([], dtype=t_dtype).element_size()
            label = f"{name} ({len(shapes)} tensors, {numel / 1e6:.0f}M) teacher {str(t_dtype)[6:]}"
            for variant in variants:
                if variant == "_foreach_lerp_" and t_dtype != torch.float32:
                    continue  # lerp needs one dtype for teacher and student
                cases.append(Case("ema_update_", label, variant, _make(shapes, t_dtype, device, variant),
                                  bytes=numel * (2 * t_size + 4), devices=(device,)))
    return cases
