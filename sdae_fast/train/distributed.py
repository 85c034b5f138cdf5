"""Process-group setup for ``torchrun`` launches (gloo on the CPU, NCCL on CUDA)."""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT); a plain launch is
    a world of one. ``device`` None picks CUDA when available."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, 0, torch.device(device or ("cuda" if use_cuda else "cpu")))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if not info.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / info.world


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        # A DDP wrapper left in a reference cycle holds the group: collect it now, so the group dies
        # here and not in interpreter finalisation, where gloo's last tensor release can abort.
        gc.collect()
        dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Rank 0's buffers on every rank. DDP broadcasts them at the start of every forward, but a
    BatchNorm's running statistics (DINO's ``use_bn_in_head``) then move with each rank's own batch,
    so after the last step the replicas differ until this runs (CUDA runs use SyncBatchNorm, as
    main_dino.py does; PyTorch has no SyncBatchNorm on the CPU)."""
    if info.enabled:
        for buf in module.buffers():
            dist.broadcast(buf, 0)
