"""Backend selection (SPEC §5), xformers-style: every backend can say why it cannot serve an input.

Each op is an :class:`Op` holding one implementation per backend:

* ``torch``  — the plain-PyTorch reference (always available; the CPU path and the test oracle);
* ``triton`` — Triton kernels from ``sdae_fast.kernels`` (GPU, or CPU under ``TRITON_INTERPRET=1``);
* ``cuda``   — CUDA C++ from ``csrc/`` (GPU only, where it wins).

Order of choice: the ``backend=`` argument, then the ``SDAE_FAST_BACKEND`` environment variable,
then automatic (the op's fastest backend that can serve the input). A forced backend that cannot
serve raises :class:`BackendUnavailable` listing every reason; the automatic choice falls back to
the reference and says so once per op and reason. Nothing here probes a device at import time.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "SDAE_FAST_BACKEND"
log = logging.getLogger("sdae_fast")


class BackendUnavailable(RuntimeError):
    """A forced backend cannot serve the given input; the message lists why."""


# --------------------------------------------------------------------------------------------
# Reasons common to every op of a backend. Each returns a list of human-readable reasons.
# --------------------------------------------------------------------------------------------
_TRITON_FOUND: bool | None = None  # find_spec's answer, looked up once (not lru_cache: Dynamo warns it skips that)


def triton_installed() -> bool:
    global _TRITON_FOUND
    if _TRITON_FOUND is None:
        _TRITON_FOUND = importlib.util.find_spec("triton") is not None
    return _TRITON_FOUND


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never inside a torch.compile trace)."""
    return (not torch.compiler.is_compiling() and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing())


def triton_interpreting() -> bool:
    # Read at call time: tests switch it on before the kernels are first imported.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _tensors(args: Iterable) -> list[torch.Tensor]:
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(_tensors(a))
    return out


def fused_dtype_why_not(tensors: Sequence[torch.Tensor]) -> list[str]:
    """The fused kernels compute in fp32 from fp32/fp16/bf16 storage: a float64 input (not a 0-dim
    scalar such as an EMA momentum tensor, which the kernels read as an fp32 scalar) would silently
    lose its precision there, so only the torch reference serves it (SPEC: float64 is for fidelity
    checks against the official code)."""
    if any(t.dtype == torch.float64 and t.dim() > 0 for t in tensors):
        return ["float64 inputs run on the torch reference only (the fused kernels compute in fp32)"]
    return []


def triton_why_not(tensors: Sequence[torch.Tensor]) -> list[str]:
    if not triton_installed():
        return ["triton is not installed (pip install triton)"]
    reasons = fused_dtype_why_not(tensors)
    devices = {t.device.type for t in tensors}
    if "cpu" in devices:
        if not triton_interpreting():
            reasons.append("inputs are on the CPU and TRITON_INTERPRET=1 is not set")
        elif any(t.dtype == torch.bfloat16 for t in tensors):
            reasons.append("the Triton interpreter has no bf16 arithmetic")
    other = devices - {"cpu", "cuda"}
    if other:
        reasons.append(f"Triton has no kernels for device type(s) {sorted(other)}")
    return reasons


@torch.compiler.assume_constant_result
def cuda_device_why_not(index: int) -> str:
    """Why the CUDA C++ backend cannot run on ``cuda:index`` ('' when it can): too old a device
    (checked first: no build for a device that cannot run it), or no extension. Decided on the
    host: under torch.compile the call runs once, at trace time, and its answer is a constant
    of the graph (loading the extension, maybe building it under a file lock, cannot be traced)."""
    from . import cuda_build  # deferred: importing it costs nothing, loading the extension does

    return cuda_build.capability_reason(index) or cuda_build.unavailable_reason() or ""


def cuda_why_not(tensors: Sequence[torch.Tensor]) -> list[str]:
    if any(t.device.type != "cuda" for t in tensors):
        return ["the CUDA C++ backend needs every tensor on a CUDA device"]
    if reasons := fused_dtype_why_not(tensors):
        return reasons
    reasons = []
    for index in sorted({0 if t.device.index is None else t.device.index for t in tensors}):
        reason = cuda_device_why_not(index)
        if reason:
            reasons.append(reason)
    return reasons


_COMMON_WHY_NOT = {
    "torch": lambda tensors: [],
    "triton": triton_why_not,
    "cuda": cuda_why_not,
}


@dataclass
class Impl:
    backend: str
    fn: Callable
    # Op-specific reasons (head dim unsupported, ...), on top of the backend's common ones.
    why_not: Callable[..., list[str]] = lambda *a, **k: []


@dataclass
class Op:
    """One op with its per-backend implementations. ``auto_order`` is fastest first."""

    name: str
    auto_order: tuple[str, ...] = ("cuda", "triton", "torch")
    # The torch.library schema (argument list and return) of ``torch.ops.sdae_fast.<name>``; the
    # call then goes through the dispatcher with the chosen backend (see sdae_fast.library).
    schema: str | None = None
    impls: dict[str, Impl] = field(default_factory=dict)
    _said: set = field(default_factory=set)

    def __post_init__(self):
        if self.schema is not None:
            from .library import define_public

            define_public(self.name, self.schema, self.impls)

    def register(self, backend: str, why_not: Callable[..., list[str]] | None = None):
        """Decorator: ``@OP.register("triton", why_not=...)`` over the backend's entry point."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {BACKENDS}")

        def deco(fn):
            self.impls[backend] = Impl(backend, fn, why_not or (lambda *a, **k: []))
            return fn

        return deco

    def reasons(self, backend: str, *args, **kwargs) -> list[str]:
        """Why ``backend`` cannot serve these arguments; empty when it can."""
        if backend not in BACKENDS:
            return [f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}"]
        impl = self.impls.get(backend)
        if impl is None:
            return [f"{self.name} has no {backend} implementation"]
        tensors = _tensors(list(args) + list(kwargs.values()))
        return _COMMON_WHY_NOT[backend](tensors) + list(impl.why_not(*args, **kwargs))

    def select(self, backend: str | None, *args, **kwargs) -> Impl:
        forced = backend or os.environ.get(ENV_VAR) or None
        if forced and forced != "auto":
            why = self.reasons(forced, *args, **kwargs)
            if why:
                source = "backend=" if backend else f"{ENV_VAR}="
                raise BackendUnavailable(
                    f"{self.name}: {source}{forced!r} cannot serve this input:\n  - " + "\n  - ".join(why)
                )
            return self.impls[forced]
        tensors = _tensors(list(args) + list(kwargs.values()))
        on_cuda = any(t.device.type == "cuda" for t in tensors)
        skipped = []
        for name in self.auto_order:
            if name != "torch" and not on_cuda:
                continue  # SPEC §5: without CUDA the automatic choice is the reference
            why = self.reasons(name, *args, **kwargs)
            if not why:
                return self.impls[name]
            skipped.append(f"{name}: {'; '.join(why)}")
        if on_cuda and skipped:
            self._say_once(skipped)
        return self.impls["torch"]

    def _say_once(self, skipped: list[str]) -> None:
        key = tuple(skipped)
        if key not in self._said:
            self._said.add(key)
            log.warning("%s falls back to the torch reference: %s", self.name, " | ".join(skipped))

    def __call__(self, *args, backend: str | None = None, **kwargs):
        impl = self.select(backend, *args, **kwargs)  # on the host, from static properties only
        if self.schema is None:
            return impl.fn(*args, **kwargs)
        return getattr(torch.ops.sdae_fast, self.name)(*args, backend=impl.backend, **kwargs)

    def describe(self, *args, **kwargs) -> dict[str, str]:
        """For ``sdae-fast info``: backend -> 'ok' or the reasons it cannot serve these inputs."""
        return {b: ("ok" if not (why := self.reasons(b, *args, **kwargs)) else "; ".join(why)) for b in BACKENDS}


OPS: dict[str, Op] = {}


def op(name: str, auto_order: tuple[str, ...] = ("cuda", "triton", "torch"), schema: str | None = None) -> Op:
    """Create (once) and return the :class:`Op` called ``name`` (``torch.ops.sdae_fast.<name>`` when
    given a ``schema``)."""
    if name not in OPS:
        OPS[name] = Op(name, auto_order, schema)
    return OPS[name]
