"""``patch(model)`` / ``unpatch(model)``: one instance of MAE's ``MaskedAutoencoderViT`` on the fused ops.

Works on facebookresearch/mae ``models_mae.MaskedAutoencoderViT`` and on SdAE's student copy of it
(AbrahamYabo/SdAE ``models_mae``, whose ``random_masking`` also returns ``ids_unkeep``). The class
is recognised by its attributes (``patch_embed``, ``cls_token``, ``pos_embed``, ``blocks``,
``norm``, ``decoder_embed``, ``mask_token``, ``decoder_pos_embed``, ``decoder_blocks``,
``decoder_norm``, ``decoder_pred``, ``norm_pix_loss`` and the methods below), never by where it
was imported from. Three parts, each its own flag:

* ``masking``: ``forward_encoder`` draws the masking noise exactly as the official
  ``random_masking`` does (``torch.rand(N, L, device=x.device)``, same RNG, same point in the
  step) and builds the encoder input — kept patches + their positions, cls + pos[0] in front — in
  one ``gather_tokens``;
* ``unshuffle``: ``forward_decoder`` builds the decoder input (visible tokens back in place, the
  mask token elsewhere, + decoder_pos_embed) in one ``unshuffle_tokens``;
* ``loss``: ``forward_loss`` is ``masked_mse_loss`` (``norm_pix_loss`` honoured); images that
  require grad take the class's own loss, which differentiates the target too.

``patch`` runs the class's methods and the patched ones once on a test image (same draws, eval
mode) and refuses, naming the part, a class whose masking, encoder, decoder or loss is its own.

Under the same seed the patched model's loss, prediction, mask and gradients equal the unpatched
model's (``tests/test_compat_mae.py``). The official ``random_masking`` stays callable.

Only the given instance changes: the patched methods are bound into its ``__dict__`` (the class,
other instances and a teacher are untouched) and ``unpatch`` deletes them again. A
DistributedDataParallel or ``torch.compile`` wrapper is looked through, so the order does not
matter: patch before or after ``.cuda()``/``.to()`` (the methods read the parameters at call
time), before or after DDP wrapping, before or after ``torch.compile`` (a compiled model that
already ran recompiles on its next call: dynamo guards the instance's methods). A deep copy or a
pickled whole module (``torch.save(model)``) of a patched instance is patched too; the state_dict
does not change. Under inductor, the masking noise equals eager's only with
``torch._inductor.config.fallback_random = True`` — true of the unpatched model as well.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..ema_teacher import unwrap
from ..ops.masked_mse_loss import masked_mse_loss
from ..ops.masking import gather_tokens, random_masking, unshuffle_tokens

ATTRIBUTES = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "decoder_embed", "mask_token",
              "decoder_pos_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "norm_pix_loss",
              "random_masking", "forward_encoder", "forward_decoder", "forward_loss", "patchify")
PARTS = {"masking": "forward_encoder", "unshuffle": "forward_decoder", "loss": "forward_loss"}
_STATE = "_sdae_fast_patch"  # instance attribute: {"parts", "backend", "returns_unkeep"}


def target(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``_orig_mod``) and DDP / DataParallel wrappers."""
    while True:
        inner = unwrap(getattr(model, "_orig_mod", model))
        if inner is model:
            return model
        model = inner


def is_masked_autoencoder(model: nn.Module) -> bool:
    inner = target(model)
    return all(hasattr(inner, a) for a in ATTRIBUTES)


def patched_parts(model: nn.Module) -> tuple[str, ...]:
    """The parts patched on this instance (empty when unpatched)."""
    state = target(model).__dict__.get(_STATE)
    return tuple(state["parts"]) if state else ()


def _promoted(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """The official code adds fp32 tables to (autocast) half tokens, promoting them; so does this."""
    dtype = x.dtype
    for o in others:
        dtype = torch.promote_types(dtype, o.dtype)
    return x if dtype == x.dtype else x.to(dtype)


def _returns_unkeep(model: nn.Module) -> bool:
    """SdAE's student returns (x, mask, ids_restore, ids_unkeep) from random_masking, MAE's three
    values: ask the instance's own method once on a dummy sequence, with the RNG state restored."""
    device = model.pos_embed.device
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            out = model.random_masking(torch.zeros(1, 4, 1, device=device), 0.5)
    except Exception as exc:
        raise TypeError(f"patch: {type(model).__name__}.random_masking(x, mask_ratio) does not behave as the official "
                        f"one ({type(exc).__name__}: {exc}); patch with masking=False to keep it") from exc
    if len(out) not in (3, 4):
        raise TypeError(f"patch: random_masking returned {len(out)} values; expected MAE's 3 or SdAE's 4")
    return len(out) == 4


def forward_encoder(self, x, mask_ratio):
    state = self.__dict__[_STATE]
    x = self.patch_embed(x)
    n, length, _ = x.shape
    noise = torch.rand(n, length, device=x.device)  # the official draw: same RNG stream, same order
    m = random_masking(n, length, mask_ratio, noise=noise)
    pos = self.pos_embed[0]
    x = gather_tokens(_promoted(x, pos, self.cls_token), m.ids_keep, pos_embed=pos[1:],
                      prefix=self.cls_token[0] + pos[:1], backend=state["backend"])
    for blk in self.blocks:
        x = blk(x)
    x = self.norm(x)
    if state["returns_unkeep"]:
        return x, m.mask, m.ids_restore, m.ids_masked
    return x, m.mask, m.ids_restore


def forward_decoder(self, x, ids_restore):
    state = self.__dict__[_STATE]
    x = self.decoder_embed(x)
    pos = self.decoder_pos_embed[0]
    x = unshuffle_tokens(_promoted(x, self.mask_token, pos), ids_restore, self.mask_token, pos_embed=pos,
                         num_prefix=1, backend=state["backend"])
    for blk in self.decoder_blocks:
        x = blk(x)
    x = self.decoder_norm(x)
    return self.decoder_pred(x)[:, 1:, :]


def forward_loss(self, imgs, pred, mask):
    state = self.__dict__[_STATE]
    if imgs.requires_grad and torch.is_grad_enabled():
        # The fused loss treats the target as a constant; the official one differentiates it too.
        return type(self).forward_loss(self, imgs, pred, mask)
    return masked_mse_loss(pred, self.patchify(imgs), mask, norm_target=bool(self.norm_pix_loss),
                           backend=state["backend"])


_METHODS = {"forward_encoder": forward_encoder, "forward_decoder": forward_decoder, "forward_loss": forward_loss}


def _differs(got, want, dtype) -> float | None:
    """The largest difference between two outputs (tuples compared item by item), or None when equal
    to the dtype's rounding."""
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    if len(got) != len(want):
        return float("inf")
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return float("inf")
        if not w.numel():
            continue
        d = (g.double() - w.double()).abs().max().item()
        if d > tol * (1.0 + w.double().abs().max().item()):  # relative to the output's scale
            worst = max(worst, d)
    return worst or None


def _check_same_as_class(inner: nn.Module, parts: tuple) -> None:
    """Run the class's own methods and the patched ones once on a test image, with the same random
    draws and in eval mode: a subclass with its own masking, encoder, decoder or loss is refused,
    not silently replaced. Skipped on the meta device and where the class's code itself cannot run
    the test image (the patched code, which calls into it, would not either)."""
    param = next(inner.parameters(), None)
    if param is None or param.device.type == "meta":
        return
    cls, grid = type(inner), int(round((inner.pos_embed.shape[1] - 1) ** 0.5))
    size = getattr(inner.patch_embed, "img_size", None) or (grid * inner.patch_embed.patch_size[0],) * 2
    chans = inner.patch_embed.proj.in_channels
    imgs = torch.randn(1, chans, *size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    devices = [param.device] if param.device.type == "cuda" else []
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            try:
                torch.manual_seed(0)
                enc = cls.forward_encoder(inner, imgs, 0.75)
                pred = cls.forward_decoder(inner, enc[0], enc[2])
                loss = cls.forward_loss(inner, imgs, pred, enc[1])
            except Exception:
                return
            torch.manual_seed(0)
            checks = {"masking": lambda: (inner.forward_encoder(imgs, 0.75), enc),
                      "unshuffle": lambda: (inner.forward_decoder(enc[0], enc[2]), pred),
                      "loss": lambda: (inner.forward_loss(imgs, pred, enc[1]), loss)}
            for part in parts:
                diff = _differs(*checks[part](), param.dtype)
                if diff is not None:
                    raise TypeError(f"patch: {cls.__name__}'s {PARTS[part]} does not give what the fused {part} "
                                    f"gives on a test image (largest difference {diff:.3g}): it is not the official "
                                    f"one (a subclass of its own?); patch with {part}=False to keep it")
    finally:
        inner.train(was_training)


def patch(model: nn.Module, *, masking: bool = True, unshuffle: bool = True, loss: bool = True,
          backend: str | None = None) -> nn.Module:
    """Route this instance's masking, decoder unshuffle and loss through the fused ops; returns ``model``.

    Patching an already patched instance replaces its patch (new flags, new backend).
    """
    inner = target(model)
    missing = [a for a in ATTRIBUTES if not hasattr(inner, a)]
    if missing:
        raise TypeError(f"patch: {type(inner).__name__} is not a MaskedAutoencoderViT (missing {missing})")
    unpatch(inner)
    flags = {"masking": masking, "unshuffle": unshuffle, "loss": loss}
    parts = tuple(p for p, on in flags.items() if on)
    state = {"parts": parts, "backend": backend, "returns_unkeep": _returns_unkeep(inner) if masking else False}
    inner.__dict__[_STATE] = state
    for part in parts:
        name = PARTS[part]
        # A partial, not a bound method: it pickles and deep-copies with its instance (torch.save of
        # the whole module keeps the patch; a deep copy is patched onto the copy).
        inner.__dict__[name] = functools.partial(_METHODS[name], inner)
    try:
        _check_same_as_class(inner, parts)
    except TypeError:
        unpatch(inner)
        raise
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch` on this instance (a no-op when it is not patched); returns ``model``."""
    inner = target(model)
    state = inner.__dict__.pop(_STATE, None)
    if state:
        for part in state["parts"]:
            inner.__dict__.pop(PARTS[part], None)
    return model
