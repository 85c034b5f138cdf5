"""MixedAE (Chen et al., CVPR 2023): mixing as augmentation for masked image modelling (SPEC §3, §6).

The batch is split into G = B / r groups of r consecutive images (B must be divisible by r). For
each group a random *source map* gives every patch position one of the r sources, each source
owning exactly N / r positions (a random permutation of the positions cut into r chunks), so the
encoder sees B / r full images: MAE's cost at mask ratio 1 - 1/r.

* Mixing, position and segment embedding in one ``gather_tokens``: the r sources' patch tokens of
  a group are stacked into one (r·N, D) sequence, the index of position i is ``src(i)·N + i`` and
  the position table is ``pos[i] + segment[s]`` stacked the same way.
* Encoder blocks use homologous (top-K) attention, K ≈ (1 + N) / r by default, per layer
  configurable (``topk`` as in :class:`VisionTransformer`).
* Decoder: for each source image, its own tokens are gathered from the mixed encoder output and
  the group's cls put in front (:func:`own_tokens`); ``unshuffle_tokens`` fills the other positions with the mask token (MAE's
  decoder, ``ids_restore`` per source); loss ``masked_mse_loss`` over the source's missing patches.
* ``homologous_contrastive_loss`` over the encoder's patch tokens with the source map as labels,
  weighted by ``contrastive_weight``.

MixedAE has no public official code, so all of the above is a reading of the paper (and of SPEC
§3/§7), not a reproduction: the exact mixing draw, the segment embedding's init, the top-K per
layer, the contrastive weight and temperature (this project's defaults) and the training recipe
(MAE's, ``sdae_fast.train.recipes``) are choices the paper leaves open or states only in words.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops.contrastive_loss import homologous_contrastive_loss
from ..ops.masked_mse_loss import masked_mse_loss
from ..ops.masking import gather_tokens, random_masking
from .decoder import MaskedDecoder
from .topk_attention import TopKAttention
from .vit import VisionTransformer, fixed_grid_tokens


class MixedAE(nn.Module):
    OPS_USED = ("gather_tokens", "unshuffle_tokens", "masked_mse_loss", "homologous_contrastive_loss",
                "topk_attention")

    def __init__(self, encoder: VisionTransformer, *, group_size: int = 4, decoder_dim: int = 512,
                 decoder_depth: int = 8, decoder_heads: int = 16, norm_pix_loss: bool = True,
                 contrastive_weight: float = 0.1, temperature: float = 0.07, attn_impl: str = "sdpa",
                 backend: str | None = None):
        """``encoder`` should be built with ``topk`` (e.g. ``1 / group_size``) for homologous attention."""
        super().__init__()
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {group_size}")
        if encoder.num_patches % group_size:
            raise ValueError(f"{encoder.num_patches} patches cannot be split evenly between {group_size} sources")
        self.encoder, self.group_size, self.norm_pix_loss = encoder, group_size, norm_pix_loss
        self.contrastive_weight, self.temperature, self.backend = contrastive_weight, temperature, backend
        self.segment_embed = nn.Parameter(torch.zeros(group_size, encoder.embed_dim))
        nn.init.normal_(self.segment_embed, std=0.02)
        p, c = encoder.patch_size, encoder.in_chans
        self.decoder = MaskedDecoder(encoder.num_patches, encoder.embed_dim, p * p * c, decoder_dim, decoder_depth,
                                     decoder_heads, attn_impl=attn_impl, backend=backend)

    def mixing(self, groups: int, length: int, device):
        """Source map and per-source indices from one random permutation per group.

        Returns ``labels`` (G, L): the source of each position; ``ids_keep`` (B, L/r): source b's
        positions (in shuffle order); ``ids_restore`` (B, L): MAE's restore indices with source b's
        positions first; ``mask`` (B, L): 1 where source b's patch is missing from the mixed image.
        """
        r, keep = self.group_size, length // self.group_size
        m = random_masking(groups, length, 0.0, device=device)  # one permutation of the positions per group
        labels = m.ids_restore // keep  # rank of position i in the permutation, cut into r chunks
        ids_keep = m.ids_keep.reshape(groups * r, keep)
        shift = torch.arange(r, device=device).repeat(groups)[:, None] * keep
        # Rolling the permutation by s·keep puts source s's chunk first: its ranks shift by -s·keep.
        ids_restore = (m.ids_restore.repeat_interleave(r, dim=0) - shift) % length
        mask = (labels.repeat_interleave(r, dim=0) != shift // keep).float()
        return labels, ids_keep, ids_restore, mask

    def forward(self, imgs: torch.Tensor) -> dict:
        b, r = imgs.shape[0], self.group_size
        if b % r:
            raise ValueError(f"MixedAE mixes groups of {r} images: the batch {b} must be divisible by {r}")
        enc, g = self.encoder, b // r
        tokens = fixed_grid_tokens(enc, imgs, "MixedAE")  # (B, L, D)
        length, dim = tokens.shape[1:]
        labels, ids_keep, ids_restore, mask = self.mixing(g, length, imgs.device)

        # Mixed input: stack each group's sources into one (r·L, D) row; position i takes source labels[i].
        pos = enc.pos_embed[0]
        stacked_pos = (pos[1:][None] + self.segment_embed[:, None].to(pos.dtype)).reshape(r * length, dim)
        index = labels * length + torch.arange(length, device=imgs.device)
        x = gather_tokens(tokens.reshape(g, r * length, dim), index, pos_embed=stacked_pos,
                          prefix=enc.cls_prefix(pos), backend=self.backend)
        latent = enc.forward_tokens(x)  # (G, 1 + L, D)

        own = own_tokens(latent, ids_keep, r, backend=self.backend)  # (B, 1 + L/r, D)
        pred = self.decoder(own, ids_restore)
        recon = masked_mse_loss(pred, enc.patchify(imgs), mask, norm_target=self.norm_pix_loss, backend=self.backend)
        out = {"loss": recon, "recon_loss": recon.detach()}
        if self.contrastive_weight:
            contrast = homologous_contrastive_loss(latent[:, 1:], labels, temperature=self.temperature,
                                                   backend=self.backend)
            out["loss"] = recon + self.contrastive_weight * contrast
            out["contrastive_loss"] = contrast.detach()
        return out

    @property
    def evaluated_encoder(self) -> nn.Module:
        """The backbone evaluations and the export read: a copy of the encoder with dense attention.
        Homologous (top-K) attention keeps the sources of a mixed image apart; a downstream image is
        not mixed, and the exported timm ViT, the network a fine-tuning run starts from, attends
        densely, so k-NN and the linear probe score that network (a reading of the paper, which
        fine-tunes a standard ViT)."""
        dense = copy.deepcopy(self.encoder)
        for module in dense.modules():
            if isinstance(module, TopKAttention):
                module.topk = None
        if "topk" in getattr(dense, "config", {}):  # so that ``dense.fresh()`` builds a dense twin too
            dense.config = {**dense.config, "topk": None}
        return dense

    def set_schedule(self, total_steps: int, steps_per_epoch: int) -> None:
        """No schedule of its own."""

    def after_step(self) -> None:
        """Nothing to do after an optimiser step (no teacher)."""


def own_tokens(latent: torch.Tensor, ids_keep: torch.Tensor, group_size: int, *, backend=None) -> torch.Tensor:
    """Each source's own tokens with its group's cls in front, out of the mixed encoder output
    (G, 1 + L, D): (G·r, 1 + L/r, D).

    The r sources of a group own disjoint positions, so the patch gather has no repeated index and
    its backward takes the gather's common path; the cls row, shared by the r sources, is copied
    apart (its gradient sums over them) instead of being gathered r times per group, which would
    send every image through the serial repeated-index backward.
    """
    patches = gather_tokens(latent[:, 1:], ids_keep, groups=group_size, backend=backend)
    cls = latent[:, :1].repeat_interleave(group_size, dim=0)
    return torch.cat([cls, patches], dim=1)
