"""Stand-ins for the official code that sdae_fast.compat replaces: the test oracles of
``tests/test_compat_*.py`` and the "original" side of the compat benchmarks.

Written from reading facebookresearch/mae ``models_mae.py`` (commit 6a2ba40), AbrahamYabo/SdAE
``models_mae.py`` / ``engine_pretrain.py`` (commit 79ed28c), facebookresearch/dino ``main_dino.py``
(commit 04c0ad9) and lightly's ``update_momentum``: the same attribute and method names and the
same computations (in any dtype, float64 included), none of their code. MAE's blocks and patch
embedding are timm's, as in the official code (timm is imported when a model is built). Position
tables are random here (frozen, as the official sin-cos ones) so a wrong row cannot hide behind a
smooth table.
"""
from __future__ import annotations

import copy

import torch
from torch import nn


class OfficialMAE(nn.Module):
    """models_mae.MaskedAutoencoderViT: forward(imgs, mask_ratio) -> (loss, pred, mask)."""

    def __init__(self, img_size=16, patch_size=4, in_chans=3, embed_dim=16, depth=1, num_heads=2,
                 decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0, norm_pix_loss=False,
                 pred_dim=None):
        super().__init__()
        from timm.models.vision_transformer import Block, PatchEmbed

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


class OfficialDINOLoss:
    """main_dino.DINOLoss, single process (world size 1); the centre is rebound, as there."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, dtype=torch.float64, device=None):
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.center = torch.zeros(1, out_dim, dtype=dtype, device=device)
        if warmup_teacher_temp_epochs == 1:
            warm = [warmup_teacher_temp]  # numpy.linspace with one point gives the start
        else:
            warm = [warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * i / max(warmup_teacher_temp_epochs - 1, 1)
                    for i in range(warmup_teacher_temp_epochs)]
        self.schedule = warm + [teacher_temp] * (nepochs - warmup_teacher_temp_epochs)

    def __call__(self, student_output, teacher_output, epoch):
        student = (student_output / self.student_temp).chunk(self.ncrops)
        teacher = torch.softmax((teacher_output - self.center) / self.schedule[epoch], dim=-1).detach().chunk(2)
        total, terms = 0.0, 0
        for iq, q in enumerate(teacher):
            for v, s in enumerate(student):
                if v != iq:
                    total = total + torch.sum(-q * torch.log_softmax(s, dim=-1), dim=-1).mean()
                    terms += 1
        total = total / terms
        with torch.no_grad():
            batch_center = teacher_output.sum(dim=0, keepdim=True) / len(teacher_output)
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total


def official_delivery(student):
    """SdAE's weight_delivery: the student's entries renamed to the teacher's (``backbone.`` and
    ``encoder.`` stripped); decoder, projection, mask token and encoder.norm dropped."""
    out = {}
    for key, value in student.state_dict().items():
        if key.startswith("backbone."):
            out[key[9:]] = value
        elif key.startswith("encoder.") and "norm." not in key:
            out[key[8:]] = value
        elif not (key.startswith("decoder") or key.startswith("encoder_to_decoder.") or key.startswith("mask_token")
                  or key.startswith("encoder.norm")):
            out[key] = value
    return out


def official_ema_process(student, teacher, m):
    """SdAE's EMA_process: a copy of the teacher gets the delivered student weights (strict), then
    teacher = m·t + (1 - m)·copy, parameter by parameter."""
    crop = copy.deepcopy(teacher)
    crop.load_state_dict(official_delivery(student))
    with torch.no_grad():
        for q, k in zip(crop.parameters(), teacher.parameters()):
            k.mul_(m).add_((1 - m) * q)


@torch.no_grad()
def lightly_update_momentum(model, model_ema, m):
    """lightly: zip(ema params, params); each ema's data rebound to ema·m + param·(1 - m)."""
    for e, p in zip(model_ema.parameters(), model.parameters()):
        e.data = e.data * m + p.data * (1.0 - m)
