"""Tolerances and comparisons for testing a backend against the reference.

Tolerances derive from the dtype, never from the observed error: a backend's output in ``dtype``
is compared with the reference computed in float64. The bound is the output's rounding (one ulp of
``dtype``) plus fp32 accumulation error that grows like sqrt(terms summed).
"""
from __future__ import annotations

import math

import torch

FP32_EPS = torch.finfo(torch.float32).eps


def tolerance(dtype: torch.dtype, reduction: int = 1) -> float:
    """Relative bound for an output of ``dtype`` whose elements each sum ``reduction`` terms, in
    fp32 (fp16/bf16/fp32 accumulate in fp32), or in float64 for float64 (the reference's fidelity
    dtype, see sdae_fast.reference.stats.accumulation_dtype)."""
    acc_eps = torch.finfo(torch.float64).eps if dtype == torch.float64 else FP32_EPS
    return torch.finfo(dtype).eps + 4 * acc_eps * math.sqrt(max(reduction, 1))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype: torch.dtype | None = None,
                 reduction: int = 1, name: str = "output") -> None:
    """``|a - e| <= tol · (|e| + max|e|)`` elementwise, NaN only where expected is NaN, same shape.

    The ``max|e|`` term lets elements near zero carry the absolute error of their larger
    neighbours (cancellation), while a wrong or unwritten element still fails.
    """
    dtype = dtype or actual.dtype
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    bad_nan = torch.isnan(a) != torch.isnan(e)
    if bad_nan.any():
        idx = bad_nan.nonzero()[0].tolist()
        raise AssertionError(f"{name}: NaN mismatch at {idx} (actual {a[tuple(idx)]}, expected {e[tuple(idx)]}); "
                             f"{int(bad_nan.sum())} element(s) in all — an unwritten output?")
    finite = torch.isfinite(e)
    if (a[~finite] != e[~finite]).any() and not torch.isnan(e[~finite]).all():
        raise AssertionError(f"{name}: infinities differ")
    a, e = a[finite], e[finite]
    if e.numel() == 0:
        return
    tol = tolerance(dtype, reduction)
    err = (a - e).abs()
    bound = tol * (e.abs() + e.abs().max())
    if (err > bound).any():
        worst = int((err - bound).argmax())
        raise AssertionError(f"{name} ({dtype}): max error {err.max().item():.3e}; worst element {a[worst].item()!r} vs "
                             f"{e[worst].item()!r} (bound {bound[worst].item():.3e}, tol {tol:.2e}, "
                             f"{int((err > bound).sum())} of {e.numel()} elements out of bound)")


def randn(*shape, dtype=torch.float32, device="cpu", generator=None, requires_grad=False) -> torch.Tensor:
    t = torch.randn(*shape, generator=generator, device=device).to(dtype)
    return t.requires_grad_(requires_grad)


def triton_device() -> str:
    """Where Triton kernels run in a test session: the GPU, or the CPU under ``TRITON_INTERPRET=1``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_dtypes() -> list[torch.dtype]:
    """The interpreter has no bf16 arithmetic; the GPU runs all three."""
    if torch.cuda.is_available():
        return [torch.float32, torch.float16, torch.bfloat16]
    return [torch.float32, torch.float16]


def compile_for_hopper(module, name, signature, variants, num_warps, **options):
    """Compile a kernel's ``variants`` (constexpr dicts) for sm_90 without a GPU and return their
    :class:`sdae_fast.sm90.Facts` (registers, stack, shared memory, SASS counts, MMA kind). The
    interpreter runs kernels as Python and misses what only the compiler refuses or produces."""
    import pytest

    from . import sm90

    pytest.importorskip("triton")
    jobs = [dict(module=module, name=name, signature=signature, constants=c, options=dict(num_warps=num_warps, **options),
                 label=", ".join(f"{k}={v}" for k, v in c.items())) for c in variants]
    try:
        return sm90.compile_facts(jobs)
    except sm90.ToolchainMissing as exc:
        pytest.skip(str(exc))
