"""How many CPU threads torch runs with: one rule for ``sdae-fast pretrain`` and ``sdae-fast eval``."""
from __future__ import annotations

import torch


def apply_cpu_threads(threads: int | None, size: str | None, device: torch.device) -> int | None:
    """Set torch's thread count: ``threads`` when given; else 1 for the micro ViT on the CPU, whose
    tiny matmuls gain nothing from threads and lose much to OpenMP spin-waits on a busy CPU (an
    evaluation of the demo took 5.5 min with 2 threads beside two training jobs), and with the same
    count as its pretraining an evaluation reproduces the pretrain table to the last image; else
    torch's own choice. Returns the count set, or None."""
    if threads is None and size == "micro" and device.type == "cpu":
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    return threads
