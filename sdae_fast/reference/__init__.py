"""Plain-PyTorch references for every op of SPEC §1–§4.

Readable, fp32 math, return the input dtype (losses return fp32 scalars). They are the CPU path,
the test oracle and the "naive PyTorch" benchmark baseline. Each follows the official method code
where there is one; the docstrings say where a choice had to be made.
"""
from .attention import topk_attention
from .contrastive_loss import homologous_contrastive_loss
from .cosine_loss import cosine_loss
from .dino_loss import dino_loss, update_center_
from .ema import ema_update_
from .masked_mse_loss import masked_mse_loss
from .masking import MaskingIndices, gather_tokens, random_masking, unshuffle_tokens
from .stats import standardize

__all__ = [
    "MaskingIndices", "random_masking", "gather_tokens", "unshuffle_tokens", "ema_update_",
    "topk_attention", "cosine_loss", "masked_mse_loss", "dino_loss", "update_center_",
    "homologous_contrastive_loss", "standardize",
]
