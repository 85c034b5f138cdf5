"""Benchmark cases for the masked-token ops (SPEC §1): MAE's encoder gather and decoder unshuffle.

Variants: "fused" (the public op with backend="triton"), "naive" (MAE's official code: an
``unsqueeze(-1).repeat(1, 1, D)`` int64 index, ``+ pos``, ``cat`` of the cls token; for the decoder,
the ``repeat`` of the mask token, ``cat``, ``gather`` and ``cat`` of models_mae.py), and
"compile(reference)" (torch.compile of the reference, dynamic=False, built anew per case; GPU
only). ``bytes`` is the floor: every input row the op needs read once, every output written once
(backward: the full dx, zeros included).
"""
from __future__ import annotations

import os

import torch

from .. import reference
from ..ops.masking import gather_tokens, random_masking, unshuffle_tokens
from .harness import Case, Compiled, fresh, register

MODELS = {"ViT-B": 768, "ViT-L": 1024}
PATCHES, KEEP = 196, 49  # 224 px / 16, mask ratio 0.75


def _mae_encoder_input(x, ids_keep, pos_embed, prefix):
    """models_mae.py forward_encoder: + pos on all L, gather with a (B, K, D) int64 index, cat cls."""
    x = x + pos_embed
    x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)


def _mae_decoder_input(x, ids_restore, mask_token, pos_embed):
    """models_mae.py forward_decoder, after decoder_embed."""
    mask_tokens = mask_token.reshape(1, 1, -1).repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    return torch.cat([x[:, :1, :], x_], dim=1) + pos_embed


def _gather_fns(device):
    fns = {
        "naive": _mae_encoder_input,
        "fused": lambda x, ids, pos, pre: gather_tokens(x, ids, pos_embed=pos, prefix=pre, backend="triton"),
    }
    if device == "cuda":
        fns["compile(reference)"] = Compiled(  # built per case (harness.fresh)
            lambda x, ids, pos, pre: reference.gather_tokens(x, ids, pos_embed=pos, prefix=pre))
    return fns


def _unshuffle_fns(device):
    fns = {
        "naive": _mae_decoder_input,
        "fused": lambda x, ids, mt, pos: unshuffle_tokens(x, ids, mt, pos_embed=pos, num_prefix=1, backend="triton"),
    }
    if device == "cuda":
        fns["compile(reference)"] = Compiled(
            lambda x, ids, mt, pos: reference.unshuffle_tokens(x, ids, mt, pos_embed=pos, num_prefix=1))
    return fns


def _timed(fn, args, backward: bool):
    """The zero-argument call to time: forward only, or forward + backward with a fixed grad, as
    ``torch.autograd.grad`` w.r.t. the leaves (no accumulation into ``.grad``: no add_ per rep)."""
    fn = fresh(fn)
    if not backward:
        return lambda: fn(*args)
    leaves = tuple(a for a in args if a.requires_grad)
    grad = torch.randn_like(fn(*args))
    return lambda: torch.autograd.grad(fn(*args), leaves, grad)


def _gather_make(fn, B, D, dtype, device, backward):
    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = random_masking(B, PATCHES, 1 - KEEP / PATCHES, generator=gen).ids_keep.to(device)
        leaf = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(backward)  # noqa: E731
        args = (leaf(B, PATCHES, D), ids, leaf(PATCHES, D), leaf(1, D))
        return _timed(fn, args, backward)

    return make


def _unshuffle_make(fn, B, D, dtype, device, backward):
    def make():
        gen = torch.Generator(device="cpu").manual_seed(0)
        ids = random_masking(B, PATCHES, 1 - KEEP / PATCHES, generator=gen).ids_restore.to(device)
        leaf = lambda *s: torch.randn(*s, device=device, dtype=dtype).requires_grad_(backward)  # noqa: E731
        args = (leaf(B, 1 + KEEP, D), ids, leaf(D), leaf(1 + PATCHES, D))
        return _timed(fn, args, backward)

    return make


def _gather_bytes(B, D, es, backward):
    index = B * KEEP * 8
    fwd = B * KEEP * D * es + index + PATCHES * D * es + D * es + B * (1 + KEEP) * D * es
    bwd = B * (1 + KEEP) * D * es + index + B * PATCHES * D * es + PATCHES * D * es + D * es
    return fwd + (bwd if backward else 0)


def _unshuffle_bytes(B, D, es, backward):
    index = B * PATCHES * 8
    rows_in, rows_out = B * (1 + KEEP), B * (1 + PATCHES)
    fwd = rows_in * D * es + index + D * es + (1 + PATCHES) * D * es + rows_out * D * es
    bwd = rows_out * D * es + index + rows_in * D * es + D * es + (1 + PATCHES) * D * es
    return fwd + (bwd if backward else 0)


@register("masking")
def masking_cases(device: str, quick: bool) -> list[Case]:
    if device != "cuda":
        shapes = [("tiny", 32, 4, torch.float32)]
    elif quick:  # the smallest real shape
        shapes = [("ViT-B", MODELS["ViT-B"], 64, torch.bfloat16)]
    else:
        shapes = [(model, D, B, torch.bfloat16) for model, D in MODELS.items() for B in (64, 256)]
    gather, unshuffle = _gather_fns(device), _unshuffle_fns(device)
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        gather.pop("fused"), unshuffle.pop("fused")  # Triton runs on the CPU only in its interpreter
    out = []
    for model, D, B, dtype in shapes:
        es = torch.finfo(dtype).bits // 8
        label = f"{model} B={B} {str(dtype).replace('torch.', '')}"
        for backward in (False, True):
            suffix = "fwd+bwd" if backward else "fwd"
            for variant, fn in gather.items():
                out.append(Case(f"gather_tokens {suffix}", label, variant,
                                _gather_make(fn, B, D, dtype, device, backward),
                                bytes=_gather_bytes(B, D, es, backward), devices=(device,)))
            for variant, fn in unshuffle.items():
                out.append(Case(f"unshuffle_tokens {suffix}", label, variant,
                                _unshuffle_make(fn, B, D, dtype, device, backward),
                                bytes=_unshuffle_bytes(B, D, es, backward), devices=(device,)))
    return out
