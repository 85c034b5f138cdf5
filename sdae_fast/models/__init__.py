"""The thin model layer (SPEC §6): a timm-compatible ViT and the four pretraining methods.

``build(method, size, ...)`` or a named constructor (``mae_vit_base_patch16``, ...); every model
takes ``backend=None|"torch"|"triton"|"cuda"`` and passes it to every sdae_fast op it calls.
"""
from .dino import DINO, DINOHead
from .factory import METHODS, MODELS, SIZES, build, create_model, evaluated_encoder
from .mae import MAE
from .mixedae import MixedAE
from .sdae import SdAE
from .topk_attention import TopKAttention
from .vit import VisionTransformer, get_2d_sincos_pos_embed, set_backend

globals().update(MODELS)  # the named constructors: from sdae_fast.models import sdae_vit_base_patch16

__all__ = ["VisionTransformer", "TopKAttention", "MAE", "SdAE", "MixedAE", "DINO", "DINOHead",
           "build", "create_model", "evaluated_encoder", "MODELS", "METHODS", "SIZES", "get_2d_sincos_pos_embed",
           "set_backend", *MODELS]
