"""Small sample inputs per op, so ``sdae-fast info`` can ask each backend whether it serves them."""
from __future__ import annotations

import torch


def sample_inputs(name: str, device: str):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    r = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    if name == "gather_tokens":
        return (r(2, 16, 64), torch.randint(0, 16, (2, 4), device=device)), {"pos_embed": r(16, 64), "prefix": r(1, 64), "groups": 1}
    if name == "unshuffle_tokens":
        ids = torch.stack([torch.randperm(16, device=device) for _ in range(2)])
        return (r(2, 5, 64), ids, r(64)), {"pos_embed": r(17, 64), "num_prefix": 1}
    if name == "ema_update_":
        return ([r(10, 10)], [r(10, 10)], 0.99), {}
    if name == "topk_attention":
        return (r(1, 2, 16, 64), r(1, 2, 16, 64), r(1, 2, 16, 64), 4), {}
    if name == "cosine_loss":
        return (r(3, 7, 64), r(3, 7, 64)), {"dim": 2, "standardize_target": True, "eps": 1e-6}
    if name == "masked_mse_loss":
        return (r(2, 16, 48), r(2, 16, 48), torch.ones(2, 16, device=device)), {"norm_target": True}
    if name == "dino_loss":
        return (r(8, 256), r(4, 256), torch.zeros(1, 256, device=device)), {
            "student_temp": 0.1, "teacher_temp": 0.04, "num_global": 2, "center_momentum": 0.9, "update_center": False}
    if name == "homologous_contrastive_loss":
        return (r(2, 16, 64), torch.randint(0, 4, (2, 16), device=device)), {"temperature": 0.07, "normalize": True}
    return (), {}
