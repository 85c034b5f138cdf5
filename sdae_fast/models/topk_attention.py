"""TopKAttention (SPEC §3): a timm-style attention block with MixedAE's homologous top-K attention."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.attention import topk_attention


def resolve_topk(topk: int | float | None, n: int) -> int | None:
    """An int is a key count, a float in (0, 1] a fraction of N (``round(topk·N)``, at least 1),
    None dense attention. MixedAE's K ≈ N / r is ``topk=1/r`` (49 of 197 tokens for r = 4)."""
    if topk is None:
        return None
    if isinstance(topk, bool) or not isinstance(topk, (int, float)):
        raise TypeError(f"topk must be an int, a float fraction or None, got {type(topk).__name__}")
    if isinstance(topk, float):
        if not 0.0 < topk <= 1.0:
            raise ValueError(f"a fractional topk must lie in (0, 1], got {topk}")
        return max(1, round(topk * n))
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    return int(topk)


class TopKAttention(nn.Module):
    """timm ``Attention`` (fused qkv, heads, output projection) whose queries attend to their top-K keys.

    Parameter names match timm's ``Attention`` (``qkv``, ``proj``), so weights load either way.
    ``topk`` may be an int, a fraction of N, or None (dense attention through SDPA); it is resolved
    against the token count of each call, so one block serves any N, and each layer holds its own.
    A topk that resolves to >= N is dense attention and also runs through SDPA. ``attn_drop``
    applies to the dense path only (top-K attention has no dropout). ``backend`` selects the
    top-K kernel (SPEC §5).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, topk: int | float | None = None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, backend: str | None = None):
        super().__init__()
        resolve_topk(topk, 1)  # reject a bad topk at construction, not at the first forward
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.topk, self.backend = topk, backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        k_keep = resolve_topk(self.topk, n)
        if k_keep is None or k_keep >= n:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        else:
            # q, k, v are strided views of the qkv output (contiguous in d): the kernel reads them in place.
            x = topk_attention(q, k, v, k_keep, scale=self.scale, backend=self.backend)
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))
