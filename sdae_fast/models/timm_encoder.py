"""A timm ``VisionTransformer`` as the encoder of any method (``build(method, size, encoder=vit)``).

:class:`TimmEncoder` *is* a :class:`~sdae_fast.models.vit.VisionTransformer` (it inherits every
method the models compose: ``patch_tokens``, ``cls_prefix``, ``forward_tokens``, ``patchify``,
``embed``, position interpolation) whose parts are the timm model's own modules and parameters:
``patch_embed``, ``cls_token``, ``pos_embed``, ``norm_pre``, ``blocks``, ``norm``. Nothing is copied,
so training the method trains the timm model, the state_dict keys are timm's (an export loads
strict into ``timm.create_model(..., num_classes=0)``), and masking goes through sdae_fast's fused
gather like the built-in ViT. Its ``embed(imgs)`` equals ``vit(imgs)`` (cls token after the final
norm, ``global_pool='token'``).

Served: a cls token, no register tokens, position table covering the cls token
(``no_embed_class=False``), ``global_pool='token'``, no ``fc_norm``. Any input resolution that is
a multiple of the patch size runs (the table is interpolated, as for DINO's local crops), whatever
the timm model's ``strict_img_size``. MixedAE's homologous attention swaps each block's ``attn``
for a :class:`TopKAttention` holding the same ``qkv`` / ``proj`` layers (same keys).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .topk_attention import TopKAttention
from .vit import VisionTransformer, init_linears_and_norms, without_drop_path


class TimmTopKAttention(TopKAttention):
    """TopKAttention called as timm's Block calls its attention (``attn_mask``, ``is_causal``)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is not None or is_causal:
            raise ValueError("homologous (top-K) attention takes no attention mask")
        return super().forward(x)


def _why_not(vit: nn.Module) -> list[str]:
    reasons = []
    for attr in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm"):
        if getattr(vit, attr, None) is None:
            reasons.append(f"it has no {attr}")
    if reasons:
        return reasons
    if getattr(vit, "reg_token", None) is not None:
        reasons.append("register tokens are not served")
    if getattr(vit, "no_embed_class", False):
        reasons.append("no_embed_class=True (the position table must cover the cls token)")
    if getattr(vit, "global_pool", "token") != "token":
        reasons.append(f"global_pool={vit.global_pool!r} (only 'token': embed is the cls token)")
    for attr in ("fc_norm", "norm_pre", "patch_drop"):
        if not isinstance(getattr(vit, attr, nn.Identity()), nn.Identity):
            reasons.append(f"{attr} is not Identity")
    pos_drop = getattr(vit, "pos_drop", None)
    if isinstance(pos_drop, nn.Dropout) and pos_drop.p > 0:  # the masked path adds positions itself
        reasons.append(f"pos_drop_rate={pos_drop.p} (position dropout is not applied on the masked path)")
    if getattr(vit, "dynamic_img_size", False):
        reasons.append("dynamic_img_size=True (timm resamples its position table its own way)")
    pe = vit.patch_embed
    if len(set(pe.patch_size)) != 1 or len(set(pe.grid_size)) != 1:
        reasons.append(f"non-square patches or grid ({pe.patch_size}, {pe.grid_size})")
    if vit.pos_embed.shape[1] != pe.num_patches + 1:
        reasons.append(f"pos_embed has {vit.pos_embed.shape[1]} rows, not 1 + {pe.num_patches}")
    return reasons


class TimmEncoder(VisionTransformer):
    def __init__(self, vit: nn.Module, *, topk=None, backend: str | None = None):
        nn.Module.__init__(self)  # the parts are the timm model's: nothing to build or initialise
        reasons = _why_not(vit)
        if reasons:
            raise ValueError(f"cannot use {type(vit).__name__} as an encoder: " + "; ".join(reasons))
        pe = vit.patch_embed
        self.img_size, self.patch_size, self.in_chans = pe.img_size[0], pe.patch_size[0], pe.proj.in_channels
        self.embed_dim, self.num_heads, self.backend = vit.cls_token.shape[-1], vit.blocks[0].attn.num_heads, backend
        self.grid, self.num_patches = pe.grid_size[0], pe.num_patches
        self.patch_embed, self.cls_token, self.pos_embed = pe, vit.cls_token, vit.pos_embed
        self.norm_pre, self.blocks, self.norm = getattr(vit, "norm_pre", nn.Identity()), vit.blocks, vit.norm
        if topk is not None:
            self._use_topk(topk)

    def fresh(self, pos_embed: str = "learned", weight_init: str = "trunc_normal",
              drop_path_rate: float | None = None) -> "TimmEncoder":
        """A newly initialised twin (SdAE's official teacher starts from its own random init): a copy
        of the timm modules re-initialised as timm 0.3.2 / the official teacher does (trunc-normal
        0.02 table, cls token and linears; PyTorch's Conv2d init for the patch projection), with
        drop_path off when ``drop_path_rate=0``. timm's table is always learnable: ``pos_embed`` must
        be ``"learned"``; other drop rates than 0 or None (keep) are refused, the blocks are timm's."""
        if pos_embed != "learned":
            raise ValueError(f"a timm encoder's position table is learnable: pos_embed={pos_embed!r} is not served")
        if drop_path_rate not in (None, 0, 0.0):
            raise ValueError(f"a timm encoder keeps its blocks' drop_path: drop_path_rate={drop_path_rate!r} "
                             "is not served (0 or None)")
        twin = without_drop_path(self) if drop_path_rate == 0 else copy.deepcopy(self)
        with torch.no_grad():
            nn.init.trunc_normal_(twin.pos_embed, std=0.02)
            nn.init.trunc_normal_(twin.cls_token, std=0.02)
            twin.patch_embed.proj.reset_parameters()
        init_linears_and_norms(twin.blocks, weight_init)
        init_linears_and_norms(twin.norm, weight_init)
        return twin

    def _use_topk(self, topk) -> None:
        topks = list(topk) if isinstance(topk, (list, tuple)) else [topk] * len(self.blocks)
        if len(topks) != len(self.blocks):
            raise ValueError(f"topk lists {len(topks)} layers but the encoder has {len(self.blocks)} blocks")
        for blk, k in zip(self.blocks, topks):
            if k is None:
                continue
            attn = blk.attn
            extra = [n for n, m in attn.named_children() if n in ("q_norm", "k_norm", "norm")
                     and not isinstance(m, nn.Identity)]
            if extra or getattr(attn, "gate", None) is not None:
                raise ValueError(f"top-K attention cannot replace a timm attention with {extra or ['gate']}")
            attn_drop = getattr(getattr(attn, "attn_drop", None), "p", 0.0)
            if attn_drop > 0:  # the top-K kernel has no attention dropout: it would vanish silently
                raise ValueError(f"top-K attention cannot replace a timm attention with attn_drop_rate={attn_drop}: "
                                 f"the top-K kernel applies no attention dropout")
            new = TimmTopKAttention(self.embed_dim, attn.num_heads, attn.qkv.bias is not None, topk=k,
                                    backend=self.backend)
            # The same layers: same weights, same keys, and timm's output dropout (proj_drop_rate).
            new.qkv, new.proj, new.proj_drop = attn.qkv, attn.proj, attn.proj_drop
            blk.attn = new

    def patch_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        # timm's PatchEmbed may assert its training size; the projection itself takes any multiple.
        pe = self.patch_embed
        return pe.norm(pe.proj(imgs).flatten(2).transpose(1, 2))

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_tokens(self.norm_pre(x))  # timm: norm_pre, blocks, norm


def as_encoder(encoder: nn.Module, *, topk=None, backend: str | None = None) -> VisionTransformer:
    """sdae_fast's own ViT as it is; a timm VisionTransformer (or look-alike) wrapped in :class:`TimmEncoder`."""
    if isinstance(encoder, VisionTransformer):
        if topk is not None:
            raise ValueError("topk applies to a timm encoder; build sdae_fast's ViT with topk= instead")
        return encoder
    return TimmEncoder(encoder, topk=topk, backend=backend)
