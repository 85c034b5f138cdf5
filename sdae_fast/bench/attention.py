"""Benchmark cases for top-K homologous attention (SPEC §3), MixedAE shapes.

Variants: "fused" (the Triton kernel via the public op), "naive" (the reference, which
materialises the scores), "sdpa-boolean-mask" (scores, torch.topk threshold and a boolean mask
built in PyTorch, then SDPA with that mask — the mask needs the scores, so their cost is counted),
"sdpa-dense" (plain SDPA with no selection: the floor a top-K kernel can hope for) and
"compile(reference)" on the GPU. Floors: flops are dense-equivalent (kept and dropped keys alike,
so variants compare on one scale): 4·B·H·N²·d forward (QKᵀ and PV), and FlashAttention's convention
backward = 2.5 × forward, so ×3.5 forward+backward; bytes q, k, v read and o written once
(forward), plus dO, q, k, v, o read and dq, dk, dv written.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..ops.attention import topk_attention
from ..reference.attention import topk_attention as reference
from .harness import Case, Compiled, fresh, register

# (label, B, H, N, d, topk): ViT-B / ViT-L encoders at 224 px with r = 4, and a /8 model (785 tokens).
GPU_SHAPES = [
    ("ViT-B B=64", 64, 12, 197, 64, 49),
    ("ViT-B B=256", 256, 12, 197, 64, 49),
    ("ViT-L B=64", 64, 16, 197, 64, 49),
    ("N=785 /8 B=16", 16, 12, 785, 64, 196),
]
CPU_SHAPES = [("tiny B=1 H=2 N=50", 1, 2, 50, 32, 12)]
NOTE_FWD = "flops: dense-equivalent FLOPs (kept and dropped keys), 4·B·H·N²·d"
NOTE_BWD = "flops: dense-equivalent FLOPs (kept and dropped keys), 3.5 × 4·B·H·N²·d (backward = 2.5 × forward)"


def _sdpa_boolean_mask(q, k, v, topk):
    with torch.no_grad():  # the kept set is a constant, as in the op
        s = q @ k.transpose(-2, -1)
        mask = s >= s.topk(topk, dim=-1).values[..., -1:]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _variants(device: str):
    out = {
        "naive": lambda q, k, v, topk: reference(q, k, v, topk),
        "sdpa-boolean-mask": _sdpa_boolean_mask,
        "sdpa-dense": lambda q, k, v, topk: F.scaled_dot_product_attention(q, k, v),
    }
    if device == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        out["fused"] = lambda q, k, v, topk: topk_attention(q, k, v, topk, backend="triton")
    if device == "cuda":
        out["compile(reference)"] = Compiled(reference)  # built per case (harness.fresh)
    return out


def _maker(fn, shape, topk, dtype, device, backward: bool):
    def make():
        run_fn = fresh(fn)
        q, k, v = (torch.randn(*shape, device=device, dtype=dtype, requires_grad=backward) for _ in range(3))
        if not backward:
            def run():
                with torch.no_grad():
                    return run_fn(q, k, v, topk)
            return run
        d_out = torch.randn(*shape, device=device, dtype=dtype)

        def run_with_grad():
            out = run_fn(q, k, v, topk)
            return torch.autograd.grad(out, (q, k, v), d_out)
        return run_with_grad

    return make


@register("topk_attention")
def topk_attention_cases(device: str, quick: bool) -> list[Case]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    if device == "cuda" and quick:
        shapes = shapes[:1]
    elsize = torch.finfo(dtype).bits // 8
    cases = []
    for label, b, h, n, d, topk in shapes:
        shape = (b, h, n, d)
        elems = b * h * n * d
        fwd_flops = 4 * b * h * n * n * d
        for backward in (False, True):
            op = "topk_attention fwd+bwd" if backward else "topk_attention fwd"
            nbytes = (12 if backward else 4) * elems * elsize
            flops = int(fwd_flops * (3.5 if backward else 1))
            for variant, fn in _variants(device).items():
                cases.append(Case(op, f"{label} topk={topk} {str(dtype).replace('torch.', '')}", variant,
                                  _maker(fn, shape, topk, dtype, device, backward), bytes=nbytes, flops=flops,
                                  devices=(device,), note=NOTE_BWD if backward else NOTE_FWD))
    return cases
