"""SdAE (Chen et al., ECCV 2022): self-distillated masked autoencoder (SPEC §6, §7).

Student: the encoder on the visible tokens, a decoder predicting the encoder-width features of
every patch. Teacher: an EMA of the encoder run on *multi-fold* views of the masked tokens: the
first ``shrink_num`` masked positions are split into F disjoint folds, each its own sequence with
its own cls token, built for all folds at once by one ``gather_tokens(..., groups=F)``. Targets are
the teacher's final-LN outputs; ``cosine_loss`` standardises every target token over its features
and compares them with the student's predictions at the same positions.

Official behaviour reproduced (AbrahamYabo/SdAE ``main_pretrain.py``, ``engine_pretrain.py``,
``models_teacher.py``), each a documented quirk where it departs from the paper's text:

* **Loss axes.** The cosine is taken over the *token* axis of the (B·F, M, D) tensors
  (``F.cosine_similarity``'s default dim=1) after standardising over features: ``loss_dim=1``.
  ``loss_dim=-1`` is the paper's reading (one cosine per token).
* **Teacher initialisation.** The teacher is its own randomly initialised ViT (timm 0.3.2 init:
  trunc-normal 0.02 linears, cls token and a *learnable* pos_embed), not a copy of the student:
  ``teacher_init="random"``; ``"student"`` copies the student instead.
* **Averaged keys.** Every teacher parameter is averaged toward the student's, including the
  teacher's learnable pos_embed toward the student's frozen sin-cos table.
* **Cadence.** ``ema_op="per_epoch"`` updates the teacher once at the end of every
  ``ema_frequent``-th epoch with momentum ``schedule[epoch]``; ``"per_ite"`` after every iteration
  with the same per-epoch value. The schedule is the official ``cosine_scheduler`` over epochs
  (0.96 -> 0.99), with an optional linear warm-up (``momentum_warmup_epochs`` from
  ``momentum_warmup``).
* **Drop path.** The student encoder carries its own ``drop_path_rate`` (0.25 in the paper recipe);
  the teacher is always built with 0.
* **Token budget.** ``shrink_num`` masked tokens go to the teacher ("all": every masked token); when
  it is not a multiple of F the remainder is dropped (as the official code). Officially a
  multiple of F smaller than the number of masked tokens fails on a shape mismatch; here both
  sides use the same first ``shrink_num`` tokens. ``shrink_num=None`` is the official no-shrink
  mode: the teacher sees the whole image and the loss is one cosine per masked position over its
  features (the official 2-D ``outputs[mask]``). ``num_folds=None`` (no multi-fold) is one fold.

The masked positions come out of ``random_masking`` in random order, so consecutive chunks of
``ids_masked`` are a uniformly random split into folds, laid out as the official reshape.
"""
from __future__ import annotations


import torch
from torch import nn

from ..ops.cosine_loss import cosine_loss
from ..ops.masking import gather_tokens, random_masking
from ..reference.masking import num_kept
from ..validate import check_int
from .decoder import MaskedDecoder
from .teacher import EmaTeacherMixin
from .vit import VisionTransformer, fixed_grid_tokens, without_drop_path

EMA_OPS = {"per_epoch": "epoch", "per_ite": "iteration"}


class SdAE(EmaTeacherMixin, nn.Module):
    OPS_USED = ("gather_tokens", "unshuffle_tokens", "cosine_loss")

    def __init__(self, encoder: VisionTransformer, *, mask_ratio: float = 0.75, num_folds: int | None = 3,
                 shrink_num: int | str | None = "all", decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, loss_dim: int = 1, teacher_init: str = "random",
                 base_momentum: float = 0.96, final_momentum: float = 0.99, ema_op: str = "per_epoch",
                 ema_frequent: int = 1, momentum_warmup_epochs: int = 0, momentum_warmup: float = 0.0,
                 attn_impl: str = "sdpa", backend: str | None = None):
        super().__init__()
        if loss_dim not in (-1, 1, 2):
            raise ValueError(f"SdAE: loss_dim must be 1 (tokens, official) or -1/2 (features, the paper), got {loss_dim}")
        if ema_op not in EMA_OPS:
            raise ValueError(f"SdAE: ema_op must be one of {sorted(EMA_OPS)}, got {ema_op!r}")
        if teacher_init not in ("random", "student"):
            raise ValueError(f"SdAE: teacher_init must be 'random' or 'student', got {teacher_init!r}")
        self.encoder, self.mask_ratio, self.loss_dim, self.backend = encoder, mask_ratio, loss_dim, backend
        self.num_folds = 1 if num_folds is None else check_int("SdAE: num_folds", num_folds, ge=1)
        self.decoder = MaskedDecoder(encoder.num_patches, encoder.embed_dim, encoder.embed_dim, decoder_dim,
                                     decoder_depth, decoder_heads, attn_impl=attn_impl, backend=backend)
        if teacher_init == "random":  # models_teacher.vit_*(drop_path_rate=0.0): timm init, learnable table
            teacher = encoder.fresh(pos_embed="learned", weight_init="trunc_normal", drop_path_rate=0.0)
        else:
            teacher = without_drop_path(encoder)
        self.teacher = nn.ModuleDict({"encoder": teacher})
        self._init_ema(base_momentum=base_momentum, final_momentum=final_momentum, per="epoch",
                       cadence=EMA_OPS[ema_op], every=ema_frequent, warmup_epochs=momentum_warmup_epochs,
                       warmup_start=momentum_warmup)
        length = encoder.num_patches
        masked = length - num_kept(length, mask_ratio)
        self.shrink_num = masked if shrink_num == "all" else shrink_num
        if self.shrink_num is not None:
            if not 1 <= self.shrink_num <= masked:
                raise ValueError(f"SdAE: shrink_num must lie in [1, {masked}] (the masked tokens of {length} "
                                 f"patches at mask ratio {mask_ratio}), got {shrink_num}")
            self.fold_size = self.shrink_num // self.num_folds
            if self.fold_size < 1:
                raise ValueError(f"SdAE: shrink_num {self.shrink_num} leaves no token per fold for "
                                 f"{self.num_folds} folds")
            if self.fold_size == 1 and loss_dim == 1:
                # The official cosine runs over each fold's tokens: over one token it is ±1, a flat loss.
                raise ValueError(f"SdAE: loss_dim=1 takes the cosine over each fold's tokens, and {self.num_folds} "
                                 f"folds of {self.shrink_num} tokens leave one token a fold (a constant loss); "
                                 f"use fewer folds or loss_dim=-1")

    def forward(self, imgs: torch.Tensor) -> dict:
        enc, b = self.encoder, imgs.shape[0]
        tokens = fixed_grid_tokens(enc, imgs, "SdAE")
        m = random_masking(b, tokens.shape[1], self.mask_ratio, device=imgs.device)
        pos = enc.pos_embed[0]
        x = gather_tokens(tokens, m.ids_keep, pos_embed=pos[1:], prefix=enc.cls_prefix(pos), backend=self.backend)
        pred = self.decoder(enc.forward_tokens(x), m.ids_restore)  # (B, L, D)
        if self.shrink_num is None:
            # Whole-image teacher; one cosine per masked position over its features.
            target = gather_tokens(self.teacher_full(imgs), m.ids_masked, backend=self.backend)
            pred = gather_tokens(pred, m.ids_masked, backend=self.backend)
            loss = cosine_loss(pred, target, dim=-1, standardize_dim=-1, backend=self.backend)
            return {"loss": loss}
        # One row of masked positions per fold: (B·F, M), fold f of image b in row b·F + f.
        folds = m.ids_masked[:, : self.num_folds * self.fold_size].reshape(b * self.num_folds, self.fold_size)
        target = self.teacher_targets(imgs, folds)
        pred = gather_tokens(pred, folds, groups=self.num_folds, backend=self.backend)  # (B·F, M, D)
        loss = cosine_loss(pred, target, dim=self.loss_dim, standardize_dim=-1, backend=self.backend)
        return {"loss": loss}

    @torch.no_grad()
    def teacher_targets(self, imgs: torch.Tensor, folds: torch.Tensor) -> torch.Tensor:
        """The teacher's final-LN features of each fold's tokens (cls dropped): (B·F, M, D)."""
        t = self.teacher["encoder"]
        pos = t.pos_embed[0]
        x = gather_tokens(t.patch_tokens(imgs), folds, pos_embed=pos[1:], prefix=t.cls_prefix(pos),
                          groups=self.num_folds, backend=self.backend)
        return t.forward_tokens(x)[:, 1:]

    @torch.no_grad()
    def teacher_full(self, imgs: torch.Tensor) -> torch.Tensor:
        """The teacher's final-LN features of every patch of the whole image (cls dropped): (B, L, D)."""
        return self.teacher["encoder"].forward_features(imgs)[:, 1:]
