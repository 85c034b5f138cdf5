"""The pretraining loop behind ``sdae-fast pretrain``.

One process or a ``torchrun`` launch (DDP). Per step: batch from the deterministic sampler, forward
under bf16 autocast on CUDA (fp32 on the CPU), backward, optional gradient clipping, AdamW step with
the warm-up + cosine lr, ``model.after_step()`` (EMA teachers) on the unwrapped model. Checkpoints
every ``ckpt_every`` steps; a resumed run repeats an uninterrupted one bit for bit on the CPU.
At the end: k-NN accuracy of the trained vs the randomly initialised encoder, and a timm export.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time

import numpy as np
import torch

from . import checkpoint as ckpt
from .data import EpochBatchSampler, load_splits
from .distributed import all_gather_objects, barrier, init_distributed, mean_across_ranks, shutdown
from .optim import lr_at, make_optimizer


def default_build(method, size, **kwargs):
    from ..models import build

    return build(method, size, **kwargs)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _scalars(out: dict) -> dict:
    """Loggable scalars of the model's output dict (the loss and any other 0-d tensors/numbers)."""
    res = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            res[key] = value.detach().float().item()
        elif isinstance(value, (int, float)):
            res[key] = float(value)
    return res


class MetricsWriter:
    """JSON lines, one per step, rank 0 only; appended to on resume."""

    def __init__(self, path: str | None, resume: bool):
        self.f = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self.f = open(path, "a" if resume else "w")

    def write(self, record: dict) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


def _build(build_fn, args, in_chans: int, seed: int):
    torch.manual_seed(seed)
    return build_fn(args.method, args.size, img_size=args.img_size, patch_size=args.patch_size,
                    in_chans=in_chans, backend=args.backend)


def _save(model, optimizer, step, steps_per_epoch, args, info):
    rngs = all_gather_objects(ckpt.rng_state(), info)  # every rank's RNG, for an exact DDP resume
    if info.is_main:
        epoch, batch = divmod(step, steps_per_epoch)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "epoch": epoch, "batch": batch, "rng": rngs, "world": info.world, "args": vars(args)}
        path = ckpt.checkpoint_path(args.out, step)
        ckpt.save_atomic(state, path)
        ckpt.prune_checkpoints(args.out, args.keep_ckpts)
    barrier(info)


def pretrain(args, build_fn=None) -> dict:
    """Run pretraining as configured by ``args`` (see ``sdae_fast.train.cli``); returns a summary dict
    with the per-step losses, the final step and, when computed, the k-NN accuracies."""
    build_fn = build_fn or default_build
    info = init_distributed(args.device)
    threads = args.threads
    if threads is None and args.size == "micro" and info.device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    try:
        return _pretrain(args, build_fn, info)
    finally:
        shutdown(info)


def _pretrain(args, build_fn, info) -> dict:
    say = print if info.is_main and not args.quiet else (lambda *a, **k: None)
    if args.method == "mixedae" and args.batch_size % 4:
        raise ValueError(f"MixedAE mixes groups of 4 images: --batch-size {args.batch_size} must be divisible by 4")
    splits = load_splits(args.data, args.img_size, args.holdout)
    sampler = EpochBatchSampler(len(splits.train_images), args.batch_size, args.seed, info.rank, info.world)
    spe = sampler.steps_per_epoch
    total = args.steps if args.steps else args.epochs * spe
    if total < 1:
        raise ValueError("nothing to train: give --steps or --epochs >= 1")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * total))
    resume_path = ckpt.resolve_resume(args.resume, args.out) if args.resume else None
    state = ckpt.load_checkpoint(resume_path) if resume_path else None

    seed_everything(args.seed)
    model = _build(build_fn, args, splits.in_chans, args.seed).to(info.device)
    model.set_schedule(total, spe)
    optimizer = make_optimizer(model, args.method, args.lr, args.weight_decay)
    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint {resume_path!r} does not fit this model/optimizer "
                             f"(method {args.method}, size {args.size}): {exc}") from exc
        step = int(state["step"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[info.rank] if len(rngs) == info.world else rngs[0])
        say(f"resumed from {resume_path} at step {step}")
    else:
        seed_everything(args.seed + info.rank)  # different masks per rank, same initial weights
    if step >= total:
        say(f"already at step {step} of {total}: nothing to train")

    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=args.find_unused)
    trainable = [p for p in model.parameters() if p.requires_grad]
    train_images = splits.train_images.to(info.device) if info.device.type == "cuda" else splits.train_images
    metrics = MetricsWriter(args.metrics if info.is_main else None, resume=state is not None)
    global_batch = args.batch_size * info.world
    say(f"pretrain {args.method} ({args.size}) on {splits.name}: {len(splits.train_images)} train / "
        f"{len(splits.heldout_images)} held-out images, {total} steps ({spe}/epoch), global batch "
        f"{global_batch}, {info.world} process(es) on {info.device}")

    losses, t_window, n_window = [], time.perf_counter(), 0
    stop_at = min(total, args.stop_after) if args.stop_after else total
    model.train()
    epoch, batch = divmod(step, spe)
    while step < stop_at:
        for _, idx in sampler.batches(epoch, start=batch):
            t0 = time.perf_counter()
            images = train_images[idx.to(train_images.device)].to(info.device, non_blocking=True)
            lr = lr_at(step, total, args.lr, warmup, args.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(info.device):
                out = net(images)
            loss = out["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = None
            if args.clip_grad:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad)
            optimizer.step()
            model.after_step()
            step += 1
            logged = mean_across_ranks(loss.detach().float(), info).item()
            if not math.isfinite(logged):
                raise FloatingPointError(f"loss is {logged} at step {step}: lower --lr or set --clip-grad")
            losses.append(logged)
            n_window += 1
            dt = time.perf_counter() - t0
            record = {"step": step, "epoch": epoch, **_scalars(out), "loss": logged, "lr": lr,
                      "images_per_s": global_batch / dt if dt > 0 else None}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.write(record)
            if step % args.log_every == 0 or step == stop_at:
                now = time.perf_counter()
                rate = n_window * global_batch / max(now - t_window, 1e-9)
                say(f"step {step:>6}/{total} epoch {epoch:>3} loss {logged:.4f} lr {lr:.2e} {rate:8.1f} img/s",
                    flush=True)
                t_window, n_window = now, 0
            if args.ckpt_every and (step % args.ckpt_every == 0 or step == total):
                _save(model, optimizer, step, spe, args, info)
            if step >= stop_at:
                break
        else:
            epoch, batch = epoch + 1, 0
    metrics.close()

    result = {"losses": losses, "step": step, "total_steps": total, "model": model}
    if step >= total and info.is_main:
        if args.knn:  # k-NN + linear probe vs random init and raw pixels; table and PNG (sdae_fast.eval)
            from ..eval.report import pretrain_report

            result.update(pretrain_report(model.encoder, lambda: _build(build_fn, args, splits.in_chans, args.seed)
                                          .encoder, args, splits, losses, info.device, say))
        if args.export:
            from .export import export_encoder

            paths = export_encoder(model.encoder, args.out, args.img_size, args.patch_size, splits.in_chans,
                                   extra={k: v for k, v in result.items() if k.startswith("knn")}
                                   | {"args": vars(args), "steps": step})
            say(f"exported encoder (timm format): {paths[0]} + {paths[1]}")
    barrier(info)
    return result

