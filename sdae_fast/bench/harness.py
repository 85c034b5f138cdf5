"""Timing, memory and ceiling measurement for the benchmarks (device/METHOD.md).

Device work is asynchronous: GPU timings use CUDA events around each call, after warm-up, and
report the median. Many benchmark inputs fit in L2 (the H200 has 60 MB), so on CUDA a 256 MB buffer
is zeroed before each timed call, outside its event window (as ``triton.testing.do_bench`` does):
every timed call starts with its inputs out of L2. Writes can still end in L2 inside the window, so
a small case can show a little over 100 % of the measured copy bandwidth. Host-bound cases (tiny
inputs, ``Case.flush_l2=False``) skip the flush. On the CPU nothing is flushed. Nothing here writes
a figure it did not measure.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

# Every other module of sdae_fast.bench defines cases (one module per op family).
NOT_CASES = {"harness", "report", "samples"}

_GENERATORS: dict[str, Callable] = {}


@dataclass
class Case:
    """One timed variant. ``make()`` builds inputs and returns the zero-argument callable to time."""

    op: str  # e.g. "gather_tokens fwd+bwd"
    shape: str  # e.g. "ViT-B B=256 bf16"
    variant: str  # "fused", "naive", "compile(reference)", "_foreach_lerp_", "sdpa", ...
    make: Callable[[], Callable[[], object]]
    bytes: int = 0  # fewest bytes the op must move (each input read once, each output written once)
    flops: int = 0  # floating-point operations the op must do
    devices: tuple = ("cuda", "cpu")
    note: str = ""
    flush_l2: bool = True  # CUDA: zero a 256 MB buffer before each timed call (module docstring)
    slow: bool = False  # seconds per case (models, data): run after the op cases under a time budget


@dataclass
class Measurement:
    case: Case
    times_ms: list = field(default_factory=list)
    peak_bytes: int | None = None
    error: str | None = None
    graphs: int = 0  # graphs torch.compile built for the case (Dynamo's count; 0 for eager variants)
    graphs_timed: int = 0  # of them, built after the first call (a recompile in the warm-up or timing)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def gbps(self) -> float | None:
        return self.case.bytes / self.median_ms / 1e6 if self.case.bytes and self.times_ms else None

    @property
    def tflops(self) -> float | None:
        return self.case.flops / self.median_ms / 1e9 if self.case.flops and self.times_ms else None


def register(name: str):
    """Decorator for a generator ``fn(device, quick) -> list[Case]``."""

    def deco(fn):
        _GENERATORS[name] = fn
        return fn

    return deco


def _import_case_modules() -> None:
    package = importlib.import_module(__package__)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in NOT_CASES:
            importlib.import_module(f"{__package__}.{info.name}")


def group_names() -> list[str]:
    """The registered case groups (what ``sdae-fast bench --ops`` selects by substring)."""
    _import_case_modules()
    return sorted(_GENERATORS)


def check_groups(only: list[str] | None) -> None:
    """``ValueError`` naming every entry of ``only`` that is a substring of no case group, with the groups."""
    names = group_names()
    unknown = [o for o in only or () if not any(o in name for name in names)]
    if unknown:
        raise ValueError(f"unknown op group{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}: "
                         f"--ops takes comma-separated substrings of the case groups; known groups: "
                         f"{', '.join(names)}")


def cases(device: str, quick: bool, only: list[str] | None = None) -> list[Case]:
    """The cases for ``device`` of every group one of ``only`` is a substring of (all groups without
    ``only``); an entry matching no group raises ``ValueError`` (:func:`check_groups`)."""
    check_groups(only)
    out = []
    for name, gen in _GENERATORS.items():
        if only and not any(o in name for o in only):
            continue
        out.extend(c for c in gen(device, quick) if device in c.devices)
    return out


class Compiled:
    """A ``torch.compile`` baseline to build per case: :func:`fresh` turns it into a new
    ``torch.compile(fn, dynamic=False)`` after ``torch._dynamo.reset()``, so one case's shapes never
    meet another's compiled graphs (no automatic dynamic shapes, no recompile limit reached and
    silent eager fallback)."""

    def __init__(self, fn: Callable):
        self.fn = fn


def compile_fresh(fn: Callable, **kwargs) -> Callable:
    """``torch.compile(fn, dynamic=False, **kwargs)`` with Dynamo's caches cleared first."""
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False, **kwargs)


def fresh(fn):
    """``fn`` itself, or for a :class:`Compiled` its :func:`compile_fresh` (call inside ``make()``)."""
    return compile_fresh(fn.fn) if isinstance(fn, Compiled) else fn


def _dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process (its counters survive ``torch._dynamo.reset()``)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


L2_FLUSH_BYTES = 256 << 20  # over 4x the largest L2 of the GPUs this runs on (H200: 60 MB)


@functools.cache
def _l2_flush_buffer() -> torch.Tensor:
    """The CUDA buffer zeroed between timed calls, allocated once per process."""
    return torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")


def time_calls(fn: Callable[[], object], device: str, *, warmup: int = 5, reps: int = 30,
               flush_l2: bool = True) -> list[float]:
    """Per-call times in ms: CUDA events on the GPU (L2 flushed before each call unless ``flush_l2``
    is False), ``perf_counter`` around a synchronised call on the CPU."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device == "cuda":
        flush = _l2_flush_buffer() if flush_l2 else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            if flush is not None:
                flush.zero_()  # queued before the start event: not inside the timed window
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(case: Case, device: str, *, warmup: int = 5, reps: int = 30) -> Measurement:
    result = Measurement(case)
    graphs0 = _dynamo_graphs()
    try:
        fn = case.make()
        fn()  # compile / autotune outside the memory and time window (and counted as a warm-up)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            result.peak_bytes = torch.cuda.max_memory_allocated() - base
        graphs1 = _dynamo_graphs()
        result.times_ms = time_calls(fn, device, warmup=max(warmup - 1, 0), reps=reps, flush_l2=case.flush_l2)
        result.graphs_timed = _dynamo_graphs() - graphs1
    except Exception as exc:  # one failing variant must not hide the others
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.graphs = _dynamo_graphs() - graphs0
        if device == "cuda":
            torch.cuda.empty_cache()
    return result


def copy_bandwidth_gbps(device: str, nbytes: int = 1 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes read plus written (the memory ceiling)."""
    n = nbytes // 4 if device == "cuda" else (64 << 20) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = time_calls(lambda: dst.copy_(src), device, warmup=3, reps=20)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e6


def matmul_tflops(device: str, n: int = 8192) -> float:
    """Measured bf16 (GPU) or fp32 (CPU) matrix-product rate on random data (the compute ceiling)."""
    if device != "cuda":
        n = 1024
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = time_calls(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / statistics.median(times) / 1e9
