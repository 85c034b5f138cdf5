"""DataLoader construction: worker count from the cores, pinned memory, non-blocking copies.

The loader is given a private ``generator``: a DataLoader otherwise draws its workers' base seed
from torch's *global* RNG each time it is iterated, which would shift the models' masks between an
interrupted and an uninterrupted run. (Our augmentations do not use worker seeds at all.)
"""
from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from .dataset import collate_for


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(world: int = 1) -> int:
    """Decoding workers per process: the cores this process may use, less one for the training loop
    (at most 8, at least 0 = decode in the main process)."""
    return max(0, min(8, available_cores() // max(world, 1) - 1))


def make_loader(dataset, batch_sampler, workers: int | None = None, pin_memory: bool = False,
                seed: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader over ``batch_sampler`` (lists of keys) with :func:`collate_views`; persistent
    workers so an epoch boundary does not re-fork them."""
    workers = default_workers(world) if workers is None else workers
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate_for(dataset),
                      pin_memory=pin_memory, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def to_device(images, device: torch.device):
    """A tensor or a list of tensors (DINO's resolutions) onto ``device``; non-blocking (the loader
    pinned them when the device is CUDA)."""
    if isinstance(images, (list, tuple)):
        return [to_device(x, device) for x in images]
    return images.to(device, non_blocking=True)
