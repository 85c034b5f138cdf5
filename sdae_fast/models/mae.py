"""MAE (He et al., CVPR 2022): reconstruct the pixels of 75 % randomly masked patches (SPEC §6).

Encoder input: the kept patches gathered with their position embedding and the cls prefix in one
``gather_tokens``; decoder input: one ``unshuffle_tokens``; loss: ``masked_mse_loss`` against the
per-patch normalised pixels (``norm_pix_loss``). That is on by default, as the paper trains
(PRETRAIN.md passes ``--norm_pix_loss``); ``models_mae.MaskedAutoencoderViT`` itself defaults to off.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.masked_mse_loss import masked_mse_loss
from ..ops.masking import gather_tokens, random_masking
from ..reference.masking import num_kept
from ..validate import check_float
from .decoder import MaskedDecoder
from .vit import VisionTransformer, fixed_grid_tokens


class MAE(nn.Module):
    OPS_USED = ("gather_tokens", "unshuffle_tokens", "masked_mse_loss")

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.75, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 attn_impl: str = "sdpa", backend: str | None = None):
        super().__init__()
        self.encoder, self.mask_ratio, self.norm_pix_loss, self.backend = encoder, mask_ratio, norm_pix_loss, backend
        length = encoder.num_patches
        if length - num_kept(length, check_float("MAE: mask_ratio", mask_ratio, ge=0.0, lt=1.0)) < 1:
            # The loss is a mean over the masked patches: with none it is 0 / 0.
            raise ValueError(f"MAE: mask_ratio {mask_ratio} masks none of the {length} patches; the loss averages "
                             f"over masked patches")
        p, c = encoder.patch_size, encoder.in_chans
        self.decoder = MaskedDecoder(encoder.num_patches, encoder.embed_dim, p * p * c, decoder_dim, decoder_depth,
                                     decoder_heads, attn_impl=attn_impl, backend=backend)

    def forward_encoder(self, imgs: torch.Tensor):
        """Encode the visible patches: (B, 1 + K, D) and the masking indices."""
        enc = self.encoder
        tokens = fixed_grid_tokens(enc, imgs, "MAE")
        b, length, _ = tokens.shape
        m = random_masking(b, length, self.mask_ratio, device=imgs.device)
        pos = enc.pos_embed[0]
        x = gather_tokens(tokens, m.ids_keep, pos_embed=pos[1:], prefix=enc.cls_prefix(pos), backend=self.backend)
        return enc.forward_tokens(x), m

    def forward(self, imgs: torch.Tensor) -> dict:
        latent, m = self.forward_encoder(imgs)
        pred = self.decoder(latent, m.ids_restore)
        target = self.encoder.patchify(imgs)
        loss = masked_mse_loss(pred, target, m.mask, norm_target=self.norm_pix_loss,
                               backend=self.backend)
        return {"loss": loss}

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """MAE has no schedule of its own (the optimiser's lr schedule lives in the training loop)."""

    def after_step(self) -> None:
        """Nothing to do after an optimiser step (no teacher)."""
