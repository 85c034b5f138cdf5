"""AdamW with the methods' reference weight decay and a warm-up + cosine learning-rate schedule.

The schedule is a pure function of the step, so resuming needs only the step counter.
"""
from __future__ import annotations

import math

import torch

# SPEC §7 / the official repos: AdamW betas (0.9, 0.95) for all; weight decay per method.
WEIGHT_DECAY = {"mae": 0.05, "sdae": 0.04, "dino": 0.04, "mixedae": 0.05}
BETAS = (0.9, 0.95)
NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token", "dist_token", "seg_embed", "segment_embed")


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then half-cosine from ``base_lr`` to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters; biases, norms (1-d) and tokens/position embeddings get no decay (timm/MAE)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim <= 1 or name.endswith(".bias") or leaf in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, method: str, lr: float, weight_decay: float | None = None):
    wd = WEIGHT_DECAY[method] if weight_decay is None else weight_decay
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, wd), lr=lr, betas=BETAS, **({"fused": True} if on_cuda else {}))
