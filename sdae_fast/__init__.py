"""sdae_fast: Triton and CUDA kernels for fast self-supervised ViT pretraining.

The ops of SPEC §1–§4, each dispatched to the fastest backend that can serve its input (SPEC §5).
Importing this package probes no device and compiles nothing.
"""
from .checks import check_errors, set_checks
from .dispatch import BACKENDS, OPS, BackendUnavailable
from .ops.attention import topk_attention
from .ops.contrastive_loss import homologous_contrastive_loss
from .ops.cosine_loss import cosine_loss
from .ops.dino_loss import dino_loss, update_center_
from .ops.ema import ema_update_
from .ops.masked_mse_loss import masked_mse_loss
from .ops.masking import gather_tokens, random_masking, unshuffle_tokens

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "OPS", "BackendUnavailable", "check_errors", "set_checks", "random_masking", "gather_tokens", "unshuffle_tokens",
    "ema_update_", "topk_attention", "cosine_loss", "masked_mse_loss", "dino_loss", "update_center_",
    "homologous_contrastive_loss",
]
