"""AdamW parameter groups, learning-rate / weight-decay schedules and gradient hooks, per method.

Everything here is a pure function of the step (and the recipe), so resuming needs only the step
counter. The official semantics each function reproduces are cited in its docstring; the tests in
``tests/test_optim_recipes.py`` hold them to float64 references written from those files.
"""
from __future__ import annotations

import math

import torch

from ..schedules import cosine_schedule  # noqa: F401  (re-exported: DINO lr / wd tables)

# AdamW betas per method: MAE main_pretrain.py and SdAE main_pretrain.py pass (0.9, 0.95); DINO
# main_dino.py builds torch.optim.AdamW(params_groups) with torch's default (0.9, 0.999).
BETAS = {"mae": (0.9, 0.95), "sdae": (0.9, 0.95), "mixedae": (0.9, 0.95), "dino": (0.9, 0.999)}
WEIGHT_DECAY = {"mae": 0.05, "sdae": 0.04, "dino": 0.04, "mixedae": 0.05}
LR_SCHEDULES = ("warmup_cosine", "mae", "dino")


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------
def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """The demo schedule: linear warm-up to ``base_lr`` over ``warmup_steps`` (reaching it at the
    last warm-up step), then half-cosine to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def mae_lr(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """MAE's ``util/lr_sched.adjust_learning_rate`` at a fractional epoch (``it / len(loader) + epoch``):
    ``lr · epoch / warmup`` during warm-up (0 at the first step), then half-cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def scaled_lr(blr: float, global_batch: int) -> float:
    """``lr = blr · global_batch / 256`` (MAE, SdAE and DINO main files; ``global_batch`` includes
    ``accum_iter`` for MAE/SdAE: ``batch_size · accum_iter · world_size``)."""
    return blr * global_batch / 256


# --------------------------------------------------------------------------------------------
# Parameter groups and the optimiser
# --------------------------------------------------------------------------------------------
def _no_decay(name: str, p: torch.Tensor) -> bool:
    # timm 0.3.2 optim_factory.add_weight_decay and DINO utils.get_params_groups agree on the rule:
    # 1-d tensors (norms, biases) and names ending in ".bias" are not decayed; tokens (1, 1, D)
    # and learnable position tables (1, N, D) are 3-d, so they are decayed.
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(model: torch.nn.Module, weight_decay: float, method: str = "mae") -> list[dict]:
    """The trainable parameters in the official groups (frozen tensors, e.g. the teacher, skipped).

    MAE/SdAE/MixedAE (timm 0.3.2 ``add_weight_decay``): ``[no-decay, decay]``. DINO
    (``get_params_groups``): ``[regularized, not regularized]``; the weight-decay schedule sets
    group 0 only.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters (requires_grad=True)")
    dec = {"params": decay, "weight_decay": weight_decay}
    nodec = {"params": no_decay, "weight_decay": 0.0}
    return [dec, nodec] if method == "dino" else [nodec, dec]


def make_optimizer(model: torch.nn.Module, method: str, lr: float, weight_decay: float | None = None,
                   betas: tuple[float, float] | None = None):
    wd = WEIGHT_DECAY[method] if weight_decay is None else weight_decay
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(param_groups(model, wd, method), lr=lr, betas=tuple(betas or BETAS[method]),
                             **({"fused": True} if on_cuda else {}))


def decayed_group(optimizer, method: str) -> dict:
    """The group whose weight decay a schedule moves (see :func:`param_groups`)."""
    return optimizer.param_groups[0 if method == "dino" else 1]


# --------------------------------------------------------------------------------------------
# Gradient hooks
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_gradients_per_param(params, clip: float) -> None:
    """DINO's ``utils.clip_gradients``: every gradient whose own L2 norm exceeds ``clip`` is scaled
    by ``clip / (norm + 1e-6)``. Multiplying by ``min(that, 1)`` is the same (× 1.0 is exact) and
    needs no host sync: one foreach norm, one foreach multiply."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    coefs = [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms]
    torch._foreach_mul_(grads, coefs)


def cancel_last_layer_gradients(model: torch.nn.Module, epoch: int, freeze_epochs: int) -> None:
    """DINO's ``utils.cancel_gradients_last_layer``: during the first ``freeze_epochs`` epochs every
    parameter named ``*last_layer*`` loses its gradient (``None``: AdamW then skips it entirely,
    no decay and no moment update), exactly as the official code."""
    if epoch >= freeze_epochs:
        return
    for name, p in model.named_parameters():
        if "last_layer" in name:
            p.grad = None
