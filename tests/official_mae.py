"""Stand-ins for the official MAE model classes, written from reading facebookresearch/mae
``models_mae.py`` (commit 6a2ba40) and AbrahamYabo/SdAE ``models_mae.py`` (commit 79ed28c): the
same attribute and method names and the same computations, none of their code. Blocks and patch
embedding are timm's, as in the official code. Position tables are random here (frozen, as the
official sin-cos ones) so a wrong row cannot hide behind a smooth table.
"""
from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import Block, PatchEmbed


class OfficialMAE(nn.Module):
    """models_mae.MaskedAutoencoderViT: forward(imgs, mask_ratio) -> (loss, pred, mask)."""

    def __init__(self, img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2,
                 decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_pix_loss=False,
                 pred_dim=None):
        super().__init__()
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_embed_dim) * 0.02)
        self.decoder_pos_embed = nn.Parameter(torch.randn(1, n + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim or patch_size ** 2 * in_chans)
        self.norm_pix_loss = norm_pix_loss

    def patchify(self, imgs):
        p = self.patch_embed.patch_size[0]
        b, c, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # n h w p q c
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def _shuffle(self, x, mask_ratio):
        n, length, dim = x.shape
        keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        order = noise.argsort(dim=1)  # ascending: the smallest noise is kept
        restore = order.argsort(dim=1)
        kept = x.gather(1, order[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return kept, mask.gather(1, restore), restore, order[:, keep:]

    def random_masking(self, x, mask_ratio):
        kept, mask, restore, _ = self._shuffle(x, mask_ratio)
        return kept, mask, restore

    def forward_encoder(self, x, mask_ratio):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        x, *rest = self.random_masking(x, mask_ratio)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return (self.norm(x), *rest)

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        n, length = ids_restore.shape
        fill = self.mask_token.expand(n, length + 1 - x.shape[1], -1)
        body = torch.cat([x[:, 1:], fill], dim=1).gather(1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], body], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        per_patch = ((pred - target) ** 2).mean(-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


class OfficialSdAEStudent(OfficialMAE):
    """SdAE's student copy: random_masking also returns ids_unkeep; forward -> (pred, mask, ids_unkeep);
    the decoder predicts encoder-width features."""

    def __init__(self, **kw):
        kw.setdefault("embed_dim", 16)
        super().__init__(pred_dim=kw["embed_dim"], **kw)

    def random_masking(self, x, mask_ratio):
        return self._shuffle(x, mask_ratio)

    def forward(self, imgs, mask_ratio=0.75):
        latent, mask, ids_restore, ids_unkeep = self.forward_encoder(imgs, mask_ratio)
        return self.forward_decoder(latent, ids_restore), mask, ids_unkeep
