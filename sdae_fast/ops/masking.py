"""Masked tokens (SPEC §1): ``random_masking``, ``gather_tokens``, ``unshuffle_tokens``."""
from __future__ import annotations

import torch

from .. import reference
from ..dispatch import op
from ..validate import (FLOAT_DTYPES, INDEX_DTYPES, check_float, check_index_range, check_int, check_same_device,
                        check_shape, check_tensor, index_range_check, names_its_errors)

GATHER = op("gather_tokens", auto_order=("triton", "torch"),
             schema="(Tensor x, Tensor index, *, Tensor? pos_embed=None, Tensor? prefix=None, int groups=1, "
                    "bool deterministic=False) -> Tensor")
UNSHUFFLE = op("unshuffle_tokens", auto_order=("triton", "torch"),
               schema="(Tensor x_vis, Tensor ids_restore, Tensor mask_token, *, Tensor? pos_embed=None, "
                      "int num_prefix=0, bool deterministic=False) -> Tensor")
index_range_check("gather_tokens", "index"), index_range_check("unshuffle_tokens", "ids_restore")  # at import


# Deferred checks let a bad index reach the backend (it is reported by sdae_fast.check_errors()):
# the reference clamps it so that indexing stays in bounds; the kernels skip it.
@GATHER.register("torch")
def _gather_torch(x, index, *, pos_embed=None, prefix=None, groups=1, deterministic=False):
    index = index.clamp(0, x.shape[1] - 1)
    return reference.gather_tokens(x, index, pos_embed=pos_embed, prefix=prefix, groups=groups)


@UNSHUFFLE.register("torch")
def _unshuffle_torch(x_vis, ids_restore, mask_token, *, pos_embed=None, num_prefix=0, deterministic=False):
    ids_restore = ids_restore.clamp(0, ids_restore.shape[1] - 1)
    return reference.unshuffle_tokens(x_vis, ids_restore, mask_token, pos_embed=pos_embed, num_prefix=num_prefix)


# The Triton kernels take any row strides (a non-unit feature stride is made contiguous in the
# launcher), every float dtype mix and int32/int64 indices, so they add no reasons of their own to
# the common ones (triton missing, CPU without the interpreter, bf16 in the interpreter).
@GATHER.register("triton")
def _gather_triton(x, index, *, pos_embed=None, prefix=None, groups=1, deterministic=False):
    from ..kernels.gather_tokens import gather_tokens as triton_gather_tokens

    return triton_gather_tokens(x, index, pos_embed=pos_embed, prefix=prefix, groups=groups,
                                deterministic=deterministic)


@UNSHUFFLE.register("triton")
def _unshuffle_triton(x_vis, ids_restore, mask_token, *, pos_embed=None, num_prefix=0, deterministic=False):
    from ..kernels.unshuffle_tokens import unshuffle_tokens as triton_unshuffle_tokens

    return triton_unshuffle_tokens(x_vis, ids_restore, mask_token, pos_embed=pos_embed, num_prefix=num_prefix,
                                   deterministic=deterministic)


@names_its_errors('random_masking')
def random_masking(B, L, mask_ratio, *, noise=None, generator=None, device=None):
    """MAE's per-sample random masking (SPEC §1): ``(ids_keep, ids_masked, ids_restore, mask)``.

    B, L non-negative ints; mask_ratio a float in [0, 1); noise None or a float (B, L) tensor whose
    ascending order is the shuffle (the same noise gives MAE's exact indices). Index generation is
    not the hot path, so this is the reference itself.
    """
    B, L = check_int("B", B, ge=0), check_int("L", L, ge=0)
    mask_ratio = check_float("mask_ratio", mask_ratio, ge=0.0, lt=1.0)
    if noise is not None:
        check_tensor("noise", noise, ndim=2, dtypes=FLOAT_DTYPES)
        check_shape("noise", noise, (B, L))
    return reference.random_masking(B, L, mask_ratio, noise=noise, generator=generator, device=device)


def _deterministic(flag) -> bool:
    """``deterministic=None`` follows ``torch.use_deterministic_algorithms``."""
    return torch.are_deterministic_algorithms_enabled() if flag is None else bool(flag)


@names_its_errors('gather_tokens')
def gather_tokens(x, index, *, pos_embed=None, prefix=None, groups=1, backend=None, deterministic=None):
    """``out[r, P + j] = x[r // groups, index[r, j]] + pos_embed[index[r, j]]``, rows ``:P`` = ``prefix``.

    x (B, L, D); index (B·groups, M) int32/int64 positions into L; pos_embed (L, D) or None;
    prefix (P, D) or None. Returns (B·groups, P + M, D) in x's dtype. Gradients flow to x
    (scatter-add; rows may repeat across groups), pos_embed and prefix. float64 inputs run on the torch reference, in float64 (for fidelity checks); triton and cuda refuse them.

    An index outside [0, L) raises IndexError: at the call with ``SDAE_FAST_CHECKS=eager``, else
    (no host sync) at the next ``sdae_fast.check_errors()``; meanwhile the Triton kernels skip a bad
    position and the torch backend clamps it into [0, L) (an answer to discard either way).
    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``) makes the Triton
    pos_embed / prefix gradients atomic-free, bitwise identical from run to run.
    """
    check_tensor("x", x, ndim=3)
    check_tensor("index", index, ndim=2, dtypes=INDEX_DTYPES)
    batch, length, dim = x.shape
    groups = check_int("groups", groups, ge=1)
    if index.shape[0] != batch * groups:
        raise ValueError(f"index must have B·groups = {batch}·{groups} = {batch * groups} rows, "
                         f"got {index.shape[0]} (index shape {tuple(index.shape)}, x shape {tuple(x.shape)})")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed)
        check_shape("pos_embed", pos_embed, (length, dim))
    if prefix is not None:
        check_tensor("prefix", prefix, ndim=2)
        check_shape("prefix", prefix, (None, dim))
    check_same_device(x=x, index=index, pos_embed=pos_embed, prefix=prefix)
    if length == 0 and index.numel():
        raise IndexError(f"gather_tokens: x has no tokens (x shape {tuple(x.shape)}) but index asks for "
                         f"{index.shape[1]} per row")
    check_index_range("index", index, length, op="gather_tokens")
    return GATHER(x, index, pos_embed=pos_embed, prefix=prefix, groups=groups, deterministic=_deterministic(deterministic),
                  backend=backend)


@names_its_errors('unshuffle_tokens')
def unshuffle_tokens(x_vis, ids_restore, mask_token, *, pos_embed=None, num_prefix=0, backend=None,
                     deterministic=None):
    """MAE's decoder input in one pass: visible tokens back in place, ``mask_token`` elsewhere.

    x_vis (B, num_prefix + K, D); ids_restore (B, L) int32/int64 in [0, L); mask_token (D,) (a
    (1, 1, D) parameter as MAE stores it is accepted); pos_embed (num_prefix + L, D) or None.
    Returns (B, num_prefix + L, D) in x_vis's dtype. Bad ids_restore values and ``deterministic``:
    as for :func:`gather_tokens` (the deterministic switch covers the mask_token / pos_embed grads).
    float64 inputs run on the torch reference, in float64 (for fidelity checks); triton and cuda refuse them.
    """
    check_tensor("x_vis", x_vis, ndim=3)
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=INDEX_DTYPES)
    check_tensor("mask_token", mask_token)
    batch, rows, dim = x_vis.shape
    if mask_token.numel() != dim:
        raise ValueError(f"mask_token must hold D = {dim} values, got shape {tuple(mask_token.shape)}")
    mask_token = mask_token.reshape(dim)
    num_prefix = check_int("num_prefix", num_prefix, ge=0, le=rows)
    length = ids_restore.shape[1]
    keep = rows - num_prefix
    if ids_restore.shape[0] != batch:
        raise ValueError(f"ids_restore must have B = {batch} rows, got shape {tuple(ids_restore.shape)}")
    if keep > length:
        raise ValueError(f"x_vis holds {keep} visible tokens, more than the L = {length} of ids_restore")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed)
        check_shape("pos_embed", pos_embed, (num_prefix + length, dim))
    check_same_device(x_vis=x_vis, ids_restore=ids_restore, mask_token=mask_token, pos_embed=pos_embed)
    check_index_range("ids_restore", ids_restore, length, op="unshuffle_tokens")
    return UNSHUFFLE(x_vis, ids_restore, mask_token, pos_embed=pos_embed, num_prefix=num_prefix,
                     deterministic=_deterministic(deterministic), backend=backend)
