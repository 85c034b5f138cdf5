"""The pretraining loop behind ``sdae-fast pretrain``.

One process or a ``torchrun`` launch (DDP). Data streams through ``sdae_fast.data``: DataLoader
workers decode and augment (the method's paper augmentation, seeded per sample from (seed, epoch,
index)), batches come from the sharded, resumable sampler, pinned and copied without blocking.
Per step: forward under bf16 autocast on CUDA (fp32 on the CPU), backward, optional gradient
clipping, AdamW step with the warm-up + cosine lr, ``model.after_step()`` (EMA teachers) on the
unwrapped model. No per-step host sync: the step's scalars stay on the device and are read every
``log_every`` steps (``progress.StepWindow``). Checkpoints every ``ckpt_every`` steps; a resumed run
repeats an uninterrupted one bit for bit on the CPU, with any number of workers.
At the end: k-NN accuracy of the trained vs the randomly initialised encoder, and a timm export.
"""
from __future__ import annotations

import contextlib
import random
import warnings

import numpy as np
import torch

import sdae_fast

from ..data import (AugmentedDataset, ShardedBatchSampler, default_workers, make_loader,
                    open_sources, to_device, train_views)
from ..threads import apply_cpu_threads
from ..validate import check_float, check_int
from . import checkpoint as ckpt
from .metrics import MetricsWriter
from .distributed import all_gather_objects, barrier, broadcast_buffers, init_distributed, shutdown
from .optim import StepSchedule, make_optimizer, scaled_lr
from .progress import Progress, StepWindow, first_nonfinite
from .recipes import accum_iter_for


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


def _compile_config(args):
    """Under --compile, a module's int counters (the model's step, read by a schedule in forward)
    are symbolic rather than constants of the graph, which recompiled every step until Dynamo's
    limit and then ran eagerly (TrainStep traces the same way)."""
    if not getattr(args, "compile", None):
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True)


def _build(build_fn, args, in_chans: int, seed: int):
    torch.manual_seed(seed)
    return build_fn(args.method, args.size, img_size=args.img_size, patch_size=args.patch_size,
                    in_chans=in_chans, backend=args.backend, **(getattr(args, "model_kw", None) or {}))


def _mixedae_group_size(args) -> int:
    """The r of the run's MixedAE: its model options' ``group_size``, else the constructor's default."""
    import inspect

    from ..models.mixedae import MixedAE
    default = inspect.signature(MixedAE).parameters["group_size"].default
    return (getattr(args, "model_kw", None) or {}).get("group_size", default)


def _save(model, optimizer, step, schedule, skipped, args, info):
    rngs = all_gather_objects(ckpt.rng_state(), info)  # every rank's RNG, for an exact DDP resume
    if info.is_main:
        epoch, batch = divmod(step, schedule.spe)
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                 "epoch": epoch, "batch": batch, "rng": rngs, "world": info.world, "args": ckpt.plain_args(args),
                 "skipped_images": skipped}
        if schedule.window_open(step):  # DDP averaged them at every backward: rank 0's are every rank's
            state["partial_grads"] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        path = ckpt.checkpoint_path(args.out, step)
        ckpt.save_checkpoint(state, path)
        ckpt.prune_checkpoints(args.out, args.keep_ckpts)
    barrier(info)


def _resume_schedules(model, state, schedule, step, total, spe, say) -> None:
    """After loading a checkpoint: the partial gradients of an unfinished accumulation window, and
    this run's schedule for the model's EMA / temperature (the lr schedule already spans ``total``)."""
    grads = state.get("partial_grads")
    if grads is not None:
        for name, p in model.named_parameters():
            if name in grads:
                p.grad = grads[name].to(device=p.device, dtype=p.dtype)
    elif schedule.window_open(step):
        say(f"warning: step {step} is inside an accumulation window and the checkpoint has no partial "
            f"gradients (an older sdae_fast): the window restarts from its remaining iterations")
    if (getattr(model, "total_steps", total), getattr(model, "steps_per_epoch", spe)) != (total, spe):
        say(f"warning: the checkpoint's run spanned {model.total_steps} steps ({model.steps_per_epoch}/epoch), "
            f"this one {total} ({spe}/epoch): the EMA and temperature schedules follow this run, as the lr does")
    model.set_schedule(total, spe)


def pretrain(args, build_fn=None) -> dict:
    """Run pretraining as configured by ``args`` (see ``sdae_fast.train.cli``); returns a summary dict
    with the per-step losses, the final step and, when computed, the k-NN accuracies."""
    build_fn = build_fn or default_build
    info = init_distributed(args.device)
    apply_cpu_threads(args.threads, args.size, info.device)
    try:
        return _pretrain(args, build_fn, info)
    finally:
        shutdown(info)


def _training_data(args, info, model, train_src, sampler):
    """The streaming loader of the method's augmented views; the first sample is decoded and augmented
    here, so an unusable folder or transform fails before the first step, naming the file."""
    dataset = AugmentedDataset(train_src, train_views(args.method, train_src, args.img_size, model),
                               seed=args.seed, bad_images=args.bad_images)
    dataset[(0, 0)]
    workers = default_workers(info.world) if args.workers is None else args.workers
    loader = make_loader(dataset, sampler, workers, pin_memory=info.device.type == "cuda", seed=args.seed)
    return loader, workers


def _pretrain(args, build_fn, info) -> dict:
    say = print if info.is_main and not args.quiet else (lambda *a, **k: None)
    if args.method == "mixedae" and args.batch_size % (group := _mixedae_group_size(args)):
        raise ValueError(f"MixedAE mixes groups of {group} images: --batch-size {args.batch_size} must be "
                         f"divisible by {group}")
    if args.knn:  # checked before training, not found after it
        check_int("--knn-k", args.knn_k, ge=1)
        check_float("--knn-temperature", args.knn_temperature, gt=0.0)
    train_src, held_src = open_sources(args.data, args.img_size, args.holdout)
    if args.knn and (why := _no_evaluation(train_src, held_src)):
        say(f"note: no k-NN / linear-probe evaluation at the end of this run: {why}")
        args.knn = False
    sampler = ShardedBatchSampler(len(train_src), args.batch_size, args.seed, info.rank, info.world)
    spe = sampler.steps_per_epoch
    total = args.steps if args.steps else args.epochs * spe
    if total < 1:
        raise ValueError("nothing to train: give --steps or --epochs >= 1")
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, round(0.05 * total))
    resume_path, state = ckpt.resume_checkpoint(args.resume, args.out)

    seed_everything(args.seed)
    model = _build(build_fn, args, train_src.in_chans, args.seed).to(info.device)
    model.set_schedule(total, spe)
    if args.accum_iter is None:  # the recipe's effective batch on this many processes
        args.accum_iter = accum_iter_for(args.effective_batch, args.batch_size, info.world)
    if args.lr is None:  # lr = blr · global batch / 256, the global batch including accumulation
        args.lr = scaled_lr(args.blr, args.batch_size * info.world * args.accum_iter)
    if args.accum_iter > min(spe, total) and info.is_main:  # windows restart every epoch (MAE's engine_pretrain.py)
        warnings.warn(f"--accum-iter {args.accum_iter} (the recipe's effective batch {args.effective_batch} on a "
                      f"global batch of {args.batch_size * info.world}) is longer than the {min(spe, total)} steps "
                      f"of {'an epoch' if spe <= total else 'this run'}: no optimizer step will run, the weights stay "
                      f"at their init; lower --accum-iter or --effective-batch, or train on more data",
                      RuntimeWarning, stacklevel=2)
    optimizer = make_optimizer(model, args.method, args.lr, args.weight_decay, args.betas)
    schedule = StepSchedule(args, spe, total, warmup)  # lr / wd schedules, accumulation, clipping, freezing
    step = 0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint {resume_path!r} does not fit this model/optimizer "
                             f"(method {args.method}, size {args.size}): {exc}") from exc
        step = int(state["step"])
        _resume_schedules(model, state, schedule, step, total, spe, say)
        rngs = state["rng"]
        if len(rngs) == info.world:
            ckpt.set_rng_state(rngs[info.rank])
        else:  # not the same run any more: at least every rank draws its own masks and crops
            say(f"warning: the checkpoint was written by {len(rngs)} process(es), this run has {info.world}: "
                f"the random draws are reseeded per rank (not an exact resume)")
            seed_everything(args.seed + info.rank + 1_000_003 * step)
        say(f"resumed from {resume_path} at step {step}")
    else:
        seed_everything(args.seed + info.rank)  # different masks per rank, same initial weights
    if info.is_main:
        for path in ckpt.set_aside_later(args.out, step):
            say(f"warning: {path[:-len(ckpt.SUPERSEDED_SUFFIX)]} is past step {step}, where this run starts: "
                f"set aside as {path}")
    barrier(info)
    if step >= total:
        say(f"already at step {step} of {total}: nothing to train")
    loader, workers = _training_data(args, info, model, train_src, sampler)

    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        if info.device.type == "cuda":  # main_dino.py: BatchNorm in the student and teacher heads syncs
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same parameters, in place
        net = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=args.find_unused)
    if getattr(args, "compile", None):
        sdae_fast.checks.prepare(info.device)  # before the first trace (sdae_fast.checks.prepare)
        net = torch.compile(net, backend=args.compile)  # forward and, through AOTAutograd, backward
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics = MetricsWriter(args.metrics if info.is_main else None, resume_step=int(state["step"]) if state else None)
    global_batch = args.batch_size * info.world
    say(f"pretrain {args.method} ({args.size}) on {train_src.name}: {len(train_src)} train / "
        f"{len(held_src)} held-out images, {total} steps ({spe}/epoch), global batch "
        f"{global_batch}, {info.world} process(es) on {info.device}, {workers} loader worker(s)")

    losses, skipped = [], int(state.get("skipped_images", 0)) if state else 0
    stop_at = min(total, args.stop_after) if args.stop_after else total
    window = StepWindow()
    progress = Progress(total, step, enabled=info.is_main and not args.quiet)

    def flush_window():
        records = window.flush(info, global_batch)
        for r in records:
            metrics.write(r | {"skipped_images": skipped} if skipped else r)
        losses.extend(r["loss"] for r in records)
        bad = first_nonfinite(records)
        if bad is not None:
            raise FloatingPointError(f"loss is {bad['loss']} at step {bad['step']}: lower --lr or set --clip-grad")
        return records[-1] if records else None

    model.train()
    epoch, batch = divmod(step, spe)
    try:
        while step < stop_at:
            sampler.set_position(epoch, batch)
            for data in loader:
                if data["skipped"]:
                    skipped += len(data["skipped"])
                    for path in data["skipped"]:
                        progress.write(f"warning: skipped unreadable image {path} ({skipped} so far)")
                images = to_device(data["images"], info.device)
                lr = schedule.apply(optimizer, step)
                with _autocast(info.device), _compile_config(args):
                    out = net(images)
                loss = out["loss"]
                grad_norm = schedule.backward_and_step(model, optimizer, loss, step, trainable)
                model.after_step()
                step += 1
                window.add({"step": step, "epoch": epoch, "lr": lr}, out, grad_norm)
                progress.update()
                if step % args.log_every == 0 or step == stop_at:
                    last = flush_window()
                    sdae_fast.check_errors()  # deferred value checks surface with the logged value
                    progress.show(last["loss"], last["images_per_s"])
                    if info.is_main and not args.quiet:
                        progress.write(f"step {step:>6}/{total} epoch {epoch:>3} loss {last['loss']:.4f} "
                                       f"lr {lr:.2e} {last['images_per_s']:8.1f} img/s")
                if args.ckpt_every and (step % args.ckpt_every == 0 or step == total):
                    flush_window()  # the metrics of every step up to the checkpoint are on disk first
                    sdae_fast.check_errors()  # never checkpoint a step that read a bad value
                    _save(model, optimizer, step, schedule, skipped, args, info)
                if step >= stop_at:
                    break
            else:
                epoch, batch = epoch + 1, 0
        flush_window()
        broadcast_buffers(model, info)  # BatchNorm statistics moved with each rank's own last batch
    finally:
        progress.close()
        metrics.close()
    if skipped:
        say(f"skipped {skipped} unreadable image(s) in this run (--bad-images skip; see the warnings above)")

    result = {"losses": losses, "step": step, "total_steps": total, "model": model, "skipped_images": skipped}
    if step >= total and info.is_main:
        from ..models import evaluated_encoder

        encoder = evaluated_encoder(model)
        if args.knn:  # k-NN + linear probe vs random init and raw pixels; table and PNG (sdae_fast.eval)
            from ..eval.report import pretrain_report

            def fresh():  # the same architecture at the run's random init
                return evaluated_encoder(_build(build_fn, args, train_src.in_chans, args.seed))

            try:  # streamed: the features are held, never the images (a folder of any size)
                result.update(pretrain_report(encoder, fresh, args, (train_src, held_src), losses, info.device, say,
                                              first_step=step - len(losses) + 1, workers=workers))  # resumed: own steps
            except Exception:
                if args.export:  # an evaluation that fails must not cost the trained encoder
                    _export(encoder, args, train_src, result, step, say)
                raise
        if args.export:
            _export(encoder, args, train_src, result, step, say)
    barrier(info)
    return result


def _export(encoder, args, train_src, result, step, say) -> None:
    """encoder.pt + encoder.json (timm's format) and pretrain_info.json with the run's results."""
    from .export import export_encoder

    paths = export_encoder(encoder, args.out, args.img_size, args.patch_size, train_src.in_chans,
                           extra={k: v for k, v in result.items() if k.startswith(("knn", "linear"))}
                           | {"args": ckpt.plain_args(args), "steps": step})
    say(f"exported encoder (timm format): {paths[0]} + {paths[1]}")


def _no_evaluation(train_src, held_src) -> str | None:
    """Why the end-of-run k-NN / linear probe cannot run on these splits, or None."""
    if len(held_src) == 0:
        return "no held-out images (--holdout 0)"
    if len(np.unique(train_src.labels)) < 2:
        return ("the training images have a single label (a folder without class subfolders?): k-NN and the "
                "linear probe need 2 or more classes; evaluate on a labelled folder with sdae-fast eval --data")
    return None
