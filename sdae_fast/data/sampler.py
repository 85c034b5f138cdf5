"""Deterministic, sharded, resumable batches of (epoch, index) keys.

Sharding is ``torch.utils.data.DistributedSampler(shuffle=True, drop_last=True)``'s: every rank
draws ``randperm(n)`` from a generator seeded ``seed + epoch``, cuts it to ``world · (n // world)``
and takes ``perm[rank::world]``. Incomplete last batches are dropped so every step sees
``batch_size`` images (MixedAE needs a multiple of its group size). The position is (epoch,
batch): ``set_position`` before iterating resumes at the exact batch of the epoch.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler):
    """A ``batch_sampler`` for ``DataLoader``: lists of ``(epoch, index)`` keys."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} training images over {world} process(es) do not fill one batch of "
                             f"{batch_size}; lower --batch-size")
        self.epoch, self.start = 0, 0

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample indices of ``epoch``, in order (DistributedSampler's, drop_last=True)."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=gen).tolist()
        return perm[: self.per_rank * self.world][self.rank::self.world]

    def set_position(self, epoch: int, start: int = 0) -> None:
        """The next iteration yields the batches of ``epoch`` from batch ``start`` on."""
        if not 0 <= start <= self.steps_per_epoch:
            raise ValueError(f"batch {start} is outside an epoch of {self.steps_per_epoch} batches")
        self.epoch, self.start = epoch, start

    def __iter__(self):
        idx, bs, epoch = self.indices(self.epoch), self.batch_size, self.epoch
        for b in range(self.start, self.steps_per_epoch):
            yield [(epoch, i) for i in idx[b * bs:(b + 1) * bs]]

    def __len__(self) -> int:
        return self.steps_per_epoch - self.start
