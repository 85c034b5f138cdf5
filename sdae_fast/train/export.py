"""Export a pretrained encoder in timm's format.

``encoder.pt`` is the ViT's state_dict under timm's parameter names (the model layer keeps them
timm-compatible) and ``encoder.json`` the keyword arguments that rebuild it::

    import json, timm, torch
    kw = json.load(open("encoder.json"))
    vit = timm.models.vision_transformer.VisionTransformer(**kw)
    vit.load_state_dict(torch.load("encoder.pt"))
"""
from __future__ import annotations

import json
import os

from .checkpoint import save_atomic


def _pair_first(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def timm_kwargs(encoder, img_size: int, patch_size: int, in_chans: int) -> dict:
    """timm ``VisionTransformer`` kwargs read off the encoder (arguments fill in what it lacks)."""
    blocks = getattr(encoder, "blocks", None)
    embed_dim = getattr(encoder, "embed_dim", None)
    if embed_dim is None and hasattr(encoder, "cls_token"):
        embed_dim = encoder.cls_token.shape[-1]
    attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
    pe = getattr(encoder, "patch_embed", None)
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if attn is not None else None
    qkv = getattr(attn, "qkv", None)
    extra = {}
    if fc1 is not None and embed_dim:
        extra["mlp_ratio"] = fc1.out_features / embed_dim
    if qkv is not None:
        extra["qkv_bias"] = qkv.bias is not None
    return {
        "img_size": int(_pair_first(getattr(pe, "img_size", img_size))),
        "patch_size": int(_pair_first(getattr(pe, "patch_size", patch_size))),
        "in_chans": int(in_chans),
        "embed_dim": int(embed_dim) if embed_dim is not None else None,
        "depth": len(blocks) if blocks is not None else None,
        "num_heads": int(getattr(attn, "num_heads", 0)) or None,
        **extra,
        "num_classes": 0,
        "global_pool": "token",  # ``embed`` is the (normed) cls token
    }


def export_encoder(encoder, out_dir: str, img_size: int, patch_size: int, in_chans: int,
                   extra: dict | None = None) -> tuple[str, str]:
    """Write ``encoder.pt`` (fp32 CPU state_dict) and ``encoder.json`` into ``out_dir``."""
    state = {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
             for k, v in encoder.state_dict().items()}
    weights = os.path.join(out_dir, "encoder.pt")
    save_atomic(state, weights)
    meta = os.path.join(out_dir, "encoder.json")
    kwargs = timm_kwargs(encoder, img_size, patch_size, in_chans)
    with open(meta, "w") as f:
        json.dump(kwargs, f, indent=2)
    if extra:
        with open(os.path.join(out_dir, "pretrain_info.json"), "w") as f:
            json.dump(extra, f, indent=2, default=str)
    return weights, meta
