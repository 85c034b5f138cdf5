"""MAE-style lightweight decoder shared by MAE, SdAE and MixedAE (SPEC §6).

Input: the encoder's output for the visible tokens (B, 1 + K, D_enc) and ``ids_restore`` (B, L).
It projects to the decoder width, puts the tokens back in place with mask tokens elsewhere and
the fixed sincos position table added, all in one ``unshuffle_tokens``; runs its blocks; and
predicts ``out_dim`` values per patch (pixels for MAE/MixedAE, teacher features for SdAE).
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.masking import unshuffle_tokens
from ..validate import check_int
from .vit import get_2d_sincos_pos_embed, init_linears_and_norms, make_blocks


class MaskedDecoder(nn.Module):
    def __init__(self, num_patches: int, in_dim: int, out_dim: int, dim: int = 512, depth: int = 8,
                 num_heads: int = 16, mlp_ratio: float = 4.0, attn_impl: str = "sdpa", backend: str | None = None):
        super().__init__()
        check_int("decoder_depth", depth, ge=0)
        grid = int(round(num_patches ** 0.5))
        if grid * grid != num_patches:
            raise ValueError(f"the decoder's sincos table needs a square grid, got {num_patches} patches")
        self.backend = backend
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(dim, grid, cls_token=True)[None], requires_grad=False)
        self.blocks = make_blocks(depth, dim, num_heads, mlp_ratio, attn_impl=attn_impl)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        init_linears_and_norms(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1 + K, D_enc), (B, L) -> (B, L, out_dim): a prediction for every patch (cls dropped)."""
        x = unshuffle_tokens(self.embed(latent), ids_restore, self.mask_token, pos_embed=self.pos_embed[0],
                             num_prefix=1, backend=self.backend)
        for blk in self.blocks:
            x = blk(x)
        return self.pred(self.norm(x))[:, 1:]
