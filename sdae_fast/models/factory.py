"""``build(method, size)`` and timm-style named constructors (SPEC §6).

Contract shared with the training loop (all methods):

* ``out = model(images)``, images (B, C, H, W) float -> dict with ``"loss"`` (fp32 scalar) and
  optional other scalar tensors;
* ``model.set_schedule(total_steps, steps_per_epoch)`` once before training;
  ``model.after_step()`` after every optimiser step;
* ``model.encoder`` is the :class:`VisionTransformer` (``embed(images) -> (B, D)``);
* :func:`evaluated_encoder` (``model.evaluated_encoder`` where a method defines one, else
  ``model.encoder``) is the encoder evaluations and the export read;
* ``model.state_dict()`` holds everything needed to resume (teacher, EMA step, DINO centre);
  trainable parameters are exactly those with ``requires_grad``;
* randomness (masking, mixing, crops) uses torch's global RNG on the images' device;
* MixedAE needs B divisible by its group size (4).
"""
from __future__ import annotations

from torch import nn

from ..validate import check_int
from .dino import DINO
from .mae import MAE
from .mixedae import MixedAE
from .sdae import SdAE
from .timm_encoder import as_encoder
from .vit import VisionTransformer

# Encoder sizes (SPEC table); "micro" is the CPU-friendly digits setup (32 px, 1 channel, 8x8 patches).
SIZES = {
    "micro": dict(embed_dim=64, depth=3, num_heads=2, img_size=32, patch_size=4, in_chans=1),
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, img_size=224, patch_size=16, in_chans=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6, img_size=224, patch_size=16, in_chans=3),
    "base": dict(embed_dim=768, depth=12, num_heads=12, img_size=224, patch_size=16, in_chans=3),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, img_size=224, patch_size=16, in_chans=3),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, img_size=224, patch_size=14, in_chans=3),
}
# Per-size defaults of the method heads: the micro setup shrinks the decoder and DINO head.
MICRO_DEFAULTS = {
    "mae": dict(decoder_dim=64, decoder_depth=1, decoder_heads=2),
    "sdae": dict(decoder_dim=64, decoder_depth=1, decoder_heads=2),
    "mixedae": dict(decoder_dim=64, decoder_depth=1, decoder_heads=2),
    "dino": dict(out_dim=256, hidden_dim=128, bottleneck_dim=64, local_size=16, num_local=2),
}
METHODS = {"mae": MAE, "sdae": SdAE, "mixedae": MixedAE, "dino": DINO}
ENCODER_KEYS = ("mlp_ratio", "qkv_bias", "pos_embed", "topk", "attn_impl", "drop_path_rate", "depth",
                "embed_dim", "num_heads", "weight_init")


# Options that only shape a new built-in ViT; with ``encoder=`` the given encoder's configuration stands.
BUILTIN_ONLY = tuple(k for k in ("img_size", "patch_size", "in_chans", *ENCODER_KEYS) if k not in ("topk", "attn_impl"))


def _homologous_topk(kw: dict) -> float:
    """MixedAE's default top-K, 1 / group_size of the keys (homologous attention, K ≈ N / r), with
    the group size checked first (its model checks it too, but only after this division)."""
    return 1.0 / check_int("MixedAE: group_size", kw.get("group_size", 4), ge=2)


def build(method: str, size: str = "micro", *, img_size: int | None = None, patch_size: int | None = None,
          in_chans: int | None = None, backend: str | None = None, encoder: nn.Module | None = None,
          **kw) -> nn.Module:
    """A ``method`` in {mae, sdae, mixedae, dino} on a ViT of ``size`` in {micro, tiny, small, base, large, huge}.

    Keyword arguments naming encoder options (``topk``, ``attn_impl``, ``drop_path_rate``, ...) go to
    the :class:`VisionTransformer`; the rest to the method (``mask_ratio``, ``decoder_dim``, ...).
    ``attn_impl`` reaches the decoder too.

    ``encoder``: an existing ViT to train instead of a new one, e.g. a timm
    ``timm.create_model("vit_base_patch16_224", num_classes=0)`` (see :mod:`.timm_encoder`). Its own
    configuration stands; ``size`` then only picks the method's head and decoder defaults.
    """
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {list(SIZES)}")
    if encoder is not None:
        return _build_on(method, size, encoder, img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                         backend=backend, **kw)
    enc_kw = dict(SIZES[size])
    for key, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans)):
        if value is not None:
            enc_kw[key] = value
    for key in ENCODER_KEYS:
        if key in kw:
            enc_kw[key] = kw.pop(key)
    if method == "dino":
        enc_kw.setdefault("pos_embed", "learned")  # DINO learns its position table
        enc_kw.setdefault("drop_path_rate", 0.1)
        enc_kw.setdefault("weight_init", "trunc_normal")  # DINO vision_transformer.py: trunc-normal 0.02 linears
    if method == "mixedae":
        enc_kw.setdefault("topk", _homologous_topk(kw))
    if "attn_impl" in enc_kw and method != "dino":
        kw.setdefault("attn_impl", enc_kw["attn_impl"])
    encoder = VisionTransformer(**enc_kw, backend=backend)
    return METHODS[method](encoder, backend=backend, **_method_defaults(method, size, kw))


def evaluated_encoder(model: nn.Module) -> nn.Module:
    """The encoder that each method's official evaluation reads: ``model.evaluated_encoder`` where the
    method defines one (DINO: the teacher's, eval_knn.py / eval_linear.py ``--checkpoint_key
    teacher``), else the student ``model.encoder`` (MAE and SdAE main_linprobe.py read
    ``checkpoint['model']`` / ``--model_mode model``; MixedAE follows MAE; a caller's own model)."""
    encoder = getattr(model, "evaluated_encoder", None)
    return model.encoder if encoder is None else encoder


def _method_defaults(method: str, size: str, kw: dict) -> dict:
    method_kw = dict(MICRO_DEFAULTS[method]) if size == "micro" else {}
    method_kw.update(kw)
    return method_kw


def _build_on(method: str, size: str, encoder: nn.Module, *, backend, **kw) -> nn.Module:
    """``build(..., encoder=...)``: the method's head and decoder around an existing encoder."""
    fixed = [k for k in BUILTIN_ONLY if kw.get(k) is not None]
    if fixed:
        raise ValueError(f"{fixed} configure the built-in ViT; with encoder= the encoder's own configuration stands")
    for k in BUILTIN_ONLY:
        kw.pop(k, None)
    if method == "dino" and "attn_impl" in kw:
        raise ValueError("attn_impl picks the built-in ViT's attention; DINO on a given encoder has no decoder to take it")
    topk = kw.pop("topk", _homologous_topk(kw) if method == "mixedae" else None)
    encoder = as_encoder(encoder, topk=topk, backend=backend)
    return METHODS[method](encoder, backend=backend, **_method_defaults(method, size, kw))


def _named(method: str, size: str, patch: int, **defaults):
    def ctor(**kw):
        return build(method, size, patch_size=patch, **{**defaults, **kw})

    ctor.__name__ = f"{method}_vit_{size}_patch{patch}"
    ctor.__doc__ = f"{method.upper()} on ViT-{size}/{patch} (``build({method!r}, {size!r}, patch_size={patch})``)."
    return ctor


MODELS = {}
for _method in METHODS:
    for _size, _patch in (("tiny", 16), ("small", 16), ("base", 16), ("large", 16), ("huge", 14)):
        MODELS[f"{_method}_vit_{_size}_patch{_patch}"] = _named(_method, _size, _patch)
    MODELS[f"{_method}_vit_micro_patch4"] = _named(_method, "micro", 4)
# DINO's ViT-S/8 and ViT-B/8 variants
MODELS.update({f"dino_vit_{s}_patch8": _named("dino", s, 8) for s in ("small", "base")})
globals().update(MODELS)


def create_model(name: str, **kw) -> nn.Module:
    """Build a model by its name, e.g. ``create_model("sdae_vit_base_patch16", backend="triton")``."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kw)

