"""SdAE (Chen et al., ECCV 2022): self-distillated masked autoencoder (SPEC §6, §7).

Student: the encoder on the visible tokens, a decoder predicting the encoder-width features of
every patch. Teacher: an EMA copy of the encoder run on *multi-fold* views of the masked tokens:
the L - K masked positions are split into F disjoint folds, each its own sequence with its own cls
token, built for all folds at once by one ``gather_tokens(..., groups=F)``. Targets are the
teacher's final-LN outputs; ``cosine_loss`` standardises them per vector and compares them with
the student's predictions at the same positions (gathered with the same index).

The masked positions come out of ``random_masking`` in random (shuffle) order, so consecutive
chunks of ``ids_masked`` already are a uniformly random split into folds; no second shuffle is
needed. When L - K is not a multiple of F the last (L - K) mod F masked positions are left out of
the teacher views (SPEC's shapes divide evenly: 147 = 3 · 49).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops.cosine_loss import cosine_loss
from ..ops.masking import gather_tokens, random_masking
from .decoder import MaskedDecoder
from .teacher import EmaTeacherMixin
from .vit import VisionTransformer


class SdAE(EmaTeacherMixin, nn.Module):
    OPS_USED = ("gather_tokens", "unshuffle_tokens", "cosine_loss")

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.75, num_folds: int = 3,
                 decoder_dim: int = 512, decoder_depth: int = 8, decoder_heads: int = 16, loss_dim: int = -1,
                 base_momentum: float = 0.96, final_momentum: float = 0.99, momentum_per: str = "epoch",
                 attn_impl: str = "sdpa", backend: str | None = None):
        """``loss_dim=-1`` takes the cosine over the feature axis (the paper); ``1`` over the token axis
        of the (B·F, M, D) tensors, as the official code does. ``momentum_per``: "epoch" or "iteration"."""
        super().__init__()
        if loss_dim not in (-1, 1, 2):
            raise ValueError(f"loss_dim must be -1/2 (features) or 1 (tokens), got {loss_dim}")
        self.encoder, self.mask_ratio, self.num_folds, self.loss_dim = encoder, mask_ratio, num_folds, loss_dim
        self.backend = backend
        self.decoder = MaskedDecoder(encoder.num_patches, encoder.embed_dim, encoder.embed_dim, decoder_dim,
                                     decoder_depth, decoder_heads, attn_impl=attn_impl, backend=backend)
        self.teacher = nn.ModuleDict({"encoder": copy.deepcopy(encoder)})
        self._init_ema(base_momentum=base_momentum, final_momentum=final_momentum, per=momentum_per)
        length = encoder.num_patches
        self.fold_size = (length - int(length * (1 - mask_ratio))) // num_folds
        if self.fold_size < 1:
            raise ValueError(f"{length} patches at mask ratio {mask_ratio} leave no masked token per fold "
                             f"for {num_folds} folds")

    def forward(self, imgs: torch.Tensor) -> dict:
        enc, b = self.encoder, imgs.shape[0]
        tokens = enc.patch_tokens(imgs)
        m = random_masking(b, tokens.shape[1], self.mask_ratio, device=imgs.device)
        pos = enc.pos_embed[0]
        x = gather_tokens(tokens, m.ids_keep, pos_embed=pos[1:], prefix=enc.cls_prefix(pos), backend=self.backend)
        pred = self.decoder(enc.forward_tokens(x), m.ids_restore)  # (B, L, D)

        # One row of masked positions per fold: (B·F, M), fold f of image b in row b·F + f.
        folds = m.ids_masked[:, : self.num_folds * self.fold_size].reshape(b * self.num_folds, self.fold_size)
        target = self.teacher_targets(imgs, folds)
        pred = gather_tokens(pred, folds, groups=self.num_folds, backend=self.backend)  # (B·F, M, D)
        loss = cosine_loss(pred, target, dim=self.loss_dim, standardize_target=True, backend=self.backend)
        return {"loss": loss}

    @torch.no_grad()
    def teacher_targets(self, imgs: torch.Tensor, folds: torch.Tensor) -> torch.Tensor:
        """The teacher's final-LN features of each fold's tokens (cls dropped): (B·F, M, D)."""
        t = self.teacher["encoder"]
        pos = t.pos_embed[0]
        x = gather_tokens(t.patch_tokens(imgs), folds, pos_embed=pos[1:], prefix=t.cls_prefix(pos),
                          groups=self.num_folds, backend=self.backend)
        return t.forward_tokens(x)[:, 1:]
