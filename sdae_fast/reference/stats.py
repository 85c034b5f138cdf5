"""Per-vector standardisation shared by the SdAE cosine loss and MAE's norm_pix_loss, and the
accumulation rules every reference shares."""
import functools

import torch


def without_autocast(fn):
    """Run a reference with autocast off on its inputs' device: a model's bf16 autocast region
    would otherwise recast the reference's fp32 matmuls (scores, similarities) to bf16 and break
    its contract of fp32 math (the fused kernels compute those in fp32 from 16-bit inputs too)."""
    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        if not torch.amp.is_autocast_available(first.device.type):  # meta (shape inference): no autocast
            return fn(first, *args, **kwargs)
        with torch.autocast(device_type=first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper


def accumulation_dtype(*tensors) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs (SPEC: fp32 accumulation); fp64 when any input is fp64, so the
    references double as a high-precision oracle in tests."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def standardize(t: torch.Tensor, dim: int = -1, eps: float = 1e-6) -> torch.Tensor:
    """``(t - mean) / sqrt(var_unbiased + eps)`` along ``dim``, in fp32.

    MAE and SdAE use the unbiased variance. For a vector of one element it is undefined (torch
    gives NaN); we take the divisor ``max(n - 1, 1)`` so such a vector standardises to 0, not NaN.
    """
    t = t.to(accumulation_dtype(t))
    n = t.shape[dim]
    mean = t.mean(dim, keepdim=True)
    var = ((t - mean) ** 2).sum(dim, keepdim=True) / max(n - 1, 1)
    return (t - mean) / torch.sqrt(var + eps)
