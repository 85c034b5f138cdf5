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


# --------------------------------------------------------------------------------------------
# One recipe's per-iteration settings, for the training loop
# --------------------------------------------------------------------------------------------
class StepSchedule:
    """What the loop does around each data iteration ``step`` (0-based), from the recipe options:

    * :meth:`apply` sets the learning rate (and the scheduled weight decay) before the forward:
      ``lr_schedule="mae"``: :func:`mae_lr` at ``step / steps_per_epoch``, set only at the first
      iteration of each accumulation window (MAE/SdAE engine_pretrain.py); ``"dino"``: entry ``step``
      of :func:`cosine_schedule` (warm-up from 0, to ``min_lr``), and the weight decay of the
      decayed group from entry ``step`` of the ``weight_decay -> weight_decay_end`` table
      (main_dino.py); ``"warmup_cosine"``: the demo's :func:`lr_at`.
    * :meth:`backward_and_step`: ``loss / accum_iter`` backward; at the end of each window (windows
      count from every epoch's first iteration, as the official ``data_iter_step``) the
      optional global-norm clip, DINO's per-parameter clip, the last-layer freeze, the AdamW step
      and zeroing of the gradients. Returns the global grad norm when it was computed.

    A checkpoint taken inside a window (:meth:`window_open`) carries the partial gradients, so a
    resumed run finishes the window exactly as an uninterrupted one.
    """

    def __init__(self, args, steps_per_epoch: int, total_steps: int, warmup_steps: int | None = None):
        """``warmup_steps`` serves when ``args.warmup_epochs`` is None (the demo), default 5% of the steps."""
        if args.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {args.lr_schedule!r}")
        self.method, self.kind = args.method, args.lr_schedule
        self.spe, self.total = steps_per_epoch, total_steps
        self.lr, self.min_lr = args.lr, args.min_lr or 0.0
        if getattr(args, "warmup_epochs", None) is not None:
            self.warmup_epochs = args.warmup_epochs
            self.warmup_steps = int(round(args.warmup_epochs * steps_per_epoch))
        else:
            self.warmup_steps = warmup_steps if warmup_steps is not None else max(1, round(0.05 * total_steps))
            self.warmup_epochs = self.warmup_steps / steps_per_epoch
        self.weight_decay, self.weight_decay_end = args.weight_decay, getattr(args, "weight_decay_end", None)
        self.accum = getattr(args, "accum_iter", None) or 1
        self.clip_grad = args.clip_grad
        self.clip_per_param = getattr(args, "clip_per_param", None)
        self.freeze_last_layer = getattr(args, "freeze_last_layer", None) or 0

    def window_open(self, step: int) -> bool:
        """Whether ``step`` iterations done leave an accumulation window unfinished (live gradients)."""
        return self.accum > 1 and (step % self.spe) % self.accum != 0

    def lr_at(self, step: int) -> float:
        if self.kind == "mae":
            # adjust_learning_rate runs when data_iter_step % accum_iter == 0, data_iter_step
            # counting from 0 in every epoch.
            start = step - (step % self.spe) % self.accum
            return mae_lr(start / self.spe, self.lr, self.min_lr, self.warmup_epochs, self.total / self.spe)
        if self.kind == "dino":
            return cosine_schedule(step, self.lr, self.min_lr, self.total, min(self.warmup_steps, self.total))
        return lr_at(step, self.total, self.lr, self.warmup_steps, self.min_lr)

    def weight_decay_at(self, step: int) -> float:
        if self.weight_decay_end is None:
            return self.weight_decay
        return cosine_schedule(step, self.weight_decay, self.weight_decay_end, self.total)

    def apply(self, optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        decayed_group(optimizer, self.method)["weight_decay"] = self.weight_decay_at(step)
        return lr

    def backward_and_step(self, model: torch.nn.Module, optimizer, loss: torch.Tensor, step: int, params=None):
        """``params``: the trainable parameters (default: those of ``model`` with requires_grad)."""
        in_epoch = step % self.spe  # engine_pretrain.py: windows restart with every epoch, which
        if in_epoch == 0 and self.accum > 1:  # begins with optimizer.zero_grad(): an unfinished
            optimizer.zero_grad(set_to_none=True)  # window of the last epoch is dropped
        (loss / self.accum if self.accum > 1 else loss).backward()
        if (in_epoch + 1) % self.accum:
            return None
        params = [p for p in model.parameters() if p.requires_grad] if params is None else params
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad) if self.clip_grad else None
        if self.clip_per_param:
            clip_gradients_per_param(params, self.clip_per_param)
        if self.freeze_last_layer:
            cancel_last_layer_gradients(model, step // self.spe, self.freeze_last_layer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm
