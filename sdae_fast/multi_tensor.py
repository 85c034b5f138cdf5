"""Block tables for multi-tensor kernels (shared by the Triton and CUDA EMA backends).

A list of tensor pairs becomes, per (teacher dtype, student dtype, alignment) group, one launch over fixed-size
blocks: ``block_tensor[b]`` says which pair block ``b`` works on and ``block_start[b]`` where in it
it starts; the pairs' addresses and sizes sit in small device tables. A training loop passes the
same parameters every step, so the tables are built once and cached by (address, size, dtype).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .dispatch import cuda_graph_capturing

BLOCK_ELEMS = 4096  # elements per program/thread block: 16 KiB of fp32, enough bytes in flight
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_CACHE: "OrderedDict[tuple, list[PairGroup]]" = OrderedDict()
_CACHE_SIZE = 16


@dataclass
class PairGroup:
    t_dtype: torch.dtype
    s_dtype: torch.dtype
    aligned: bool  # every address 16-byte aligned: kernels may use 16-byte vector loads
    t_ptrs: torch.Tensor  # int64 (T,) teacher addresses
    s_ptrs: torch.Tensor  # int64 (T,) student addresses
    numels: torch.Tensor  # int64 (T,)
    block_tensor: torch.Tensor  # int32 (num_blocks,)
    block_start: torch.Tensor  # int64 (num_blocks,) element offset inside the tensor
    num_blocks: int


def pair_groups(teacher: list[torch.Tensor], student: list[torch.Tensor], block: int = BLOCK_ELEMS) -> list[PairGroup]:
    """The cached block tables for these pairs (empty tensors skipped)."""
    key = (block, tuple((t.data_ptr(), s.data_ptr(), t.numel(), t.dtype, s.dtype, t.device)
                        for t, s in zip(teacher, student)))
    groups = _CACHE.get(key)
    if groups is None:
        if cuda_graph_capturing():
            # Building copies the tables host -> device: not allowed inside a capture, and the graph
            # would replay on tables made for these addresses only.
            raise RuntimeError("ema_update_: no block tables for these tensors yet, and a CUDA graph is being "
                               "captured: run the update once before the capture, on the tensors the graph updates")
        groups = _build(teacher, student, block)
        _CACHE[key] = groups
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return groups


def _build(teacher, student, block) -> list[PairGroup]:
    by_kind: dict[tuple, list] = {}
    for t, s in zip(teacher, student):
        if t.numel():
            aligned = t.data_ptr() % 16 == 0 and s.data_ptr() % 16 == 0
            by_kind.setdefault((t.dtype, s.dtype, aligned), []).append((t, s))
    groups = []
    for (t_dtype, s_dtype, aligned), pairs in by_kind.items():
        device = pairs[0][0].device
        numels = torch.tensor([t.numel() for t, _ in pairs], dtype=torch.int64)
        blocks = (numels + block - 1) // block
        first = torch.cumsum(blocks, 0) - blocks
        block_tensor = torch.repeat_interleave(torch.arange(len(pairs), dtype=torch.int32), blocks)
        block_start = (torch.arange(int(blocks.sum())) - torch.repeat_interleave(first, blocks)) * block
        as_dev = lambda x: x.to(device)  # noqa: E731
        groups.append(PairGroup(
            t_dtype, s_dtype, aligned,
            as_dev(torch.tensor([t.data_ptr() for t, _ in pairs], dtype=torch.int64)),
            as_dev(torch.tensor([s.data_ptr() for _, s in pairs], dtype=torch.int64)),
            as_dev(numels), as_dev(block_tensor), as_dev(block_start), int(blocks.sum())))
    return groups


def momentum_args(momentum, device):
    """(m, 1 - m, m_tensor): fp32 scalars rounded as the reference rounds them, or, for a 0-dim
    tensor, the fp32 device pair ``[m, 1 - m]`` the kernel reads (no host sync), ``1 - m`` formed
    in float64 from the tensor's value and then rounded, as the reference does (and as a Python
    float's ``1 - m`` is: a float64 tensor updates exactly as its float; for fp32 / 16-bit
    momenta the float64 difference is exact, so this is their fp32 ``1 - m``)."""
    if isinstance(momentum, torch.Tensor):
        m64 = momentum.to(device=device, dtype=torch.float64)
        return 0.0, 0.0, torch.stack([m64, 1.0 - m64]).to(torch.float32)
    m = float(momentum)
    return m, 1.0 - m, None
