"""MAE masking, the token gather and MAE's decoder unshuffle (SPEC §1)."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .stats import accumulation_dtype


class MaskingIndices(NamedTuple):
    ids_keep: torch.Tensor  # (B, K) kept patch positions, in shuffle order
    ids_masked: torch.Tensor  # (B, L - K) removed patch positions, in shuffle order
    ids_restore: torch.Tensor  # (B, L) inverse permutation of the shuffle
    mask: torch.Tensor  # (B, L) float, 1 where the patch is removed


def num_kept(L: int, mask_ratio: float) -> int:
    """MAE's count of visible patches, ``K = int(L · (1 - mask_ratio))`` (rounded down); the other
    ``L - K`` are masked. One formula for the masking and for the models that size from it."""
    return int(L * (1 - mask_ratio))


def random_masking(B: int, L: int, mask_ratio: float, *, noise=None, generator=None, device=None) -> MaskingIndices:
    """MAE's ``random_masking`` index generation; the same ``noise`` gives MAE's exact indices."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
    if noise is None:
        noise = torch.rand(B, L, generator=generator, device=device)
    elif tuple(noise.shape) != (B, L):
        raise ValueError(f"noise must have shape ({B}, {L}), got {tuple(noise.shape)}")
    keep = num_kept(L, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(B, L, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return MaskingIndices(ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_restore, mask)


def gather_tokens(x, index, *, pos_embed=None, prefix=None, groups=1):
    """``out[r, P + j] = x[r // groups, index[r, j]] + pos_embed[index[r, j]]``; rows ``:P`` are ``prefix``.

    x (B, L, D), index (B·groups, M), pos_embed (L, D) or None, prefix (P, D) or None.
    Returns (B·groups, P + M, D) in x's dtype, computed in fp32.
    """
    rows, _ = index.shape
    index = index.long()
    source = torch.arange(rows, device=x.device) // groups
    acc = accumulation_dtype(x)
    out = x.to(acc)[source[:, None], index]
    if pos_embed is not None:
        out = out + pos_embed.to(acc)[index]
    if prefix is not None:
        out = torch.cat([prefix.to(acc).expand(rows, *prefix.shape), out], dim=1)
    return out.to(x.dtype)


def unshuffle_tokens(x_vis, ids_restore, mask_token, *, pos_embed=None, num_prefix=0):
    """MAE's decoder input: visible tokens back in place, ``mask_token`` where removed, ``+ pos_embed``.

    x_vis (B, num_prefix + K, D), ids_restore (B, L), mask_token (D,), pos_embed
    (num_prefix + L, D) or None. ``out[b, num_prefix + i]`` is visible token ``ids_restore[b, i]``
    when that is < K, else the mask token. Returns (B, num_prefix + L, D) in x_vis's dtype.
    """
    batch, _, dim = x_vis.shape
    keep = x_vis.shape[1] - num_prefix
    acc = accumulation_dtype(x_vis)
    patches = x_vis[:, num_prefix:].to(acc)
    idx = ids_restore.long()
    is_visible = idx < keep
    if keep > 0:
        gathered = torch.gather(patches, 1, idx.clamp(max=keep - 1)[..., None].expand(-1, -1, dim))
    else:
        gathered = patches.new_zeros(batch, idx.shape[1], dim)
    body = torch.where(is_visible[..., None], gathered, mask_token.to(acc).reshape(1, 1, dim))
    out = torch.cat([x_vis[:, :num_prefix].to(acc), body], dim=1)
    if pos_embed is not None:
        out = out + pos_embed.to(acc)
    return out.to(x_vis.dtype)
