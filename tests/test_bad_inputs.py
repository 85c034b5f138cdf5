"""The bad-input tier: every public op, each backend (torch; triton in the interpreter), fed wrong
dtypes and ranks, mismatched shapes, bad indices, bools for ints, strings for numbers, empty and
single-element tensors, non-contiguous views, NaN/inf, degenerate temperatures and widths, meta
tensors. A case either raises (type + message fragment naming the argument) or returns the float64
reference's value.

Host-side type/shape/dtype checks are eager; value checks (index range, mask emptiness, labels)
may be deferred to ``sdae_fast.check_errors()`` (``SDAE_FAST_CHECKS=deferred``, the default of the
sync-free design), so each case runs in both check modes and calls ``check_errors()`` right after
the op, inside ``pytest.raises``. Tensors are tiny: the interpreter is slow.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch

import sdae_fast
from sdae_fast import reference
from sdae_fast.dispatch import BackendUnavailable
from sdae_fast.testing import assert_close

check_errors = getattr(sdae_fast, "check_errors", lambda: None)
BACKENDS = ("torch", "triton")
F32, F16, F64, I64 = torch.float32, torch.float16, torch.float64, torch.int64
# float64 is for fidelity checks: the fused backends refuse it with this reason (the reference serves it).
FP64_ON_TRITON = {"triton": (BackendUnavailable, "float64 inputs run on the torch reference only")}


def r(*shape, dtype=F32):
    return torch.randn(*shape).to(dtype)


def nan_at(t, *idx, value=float("nan")):
    t = t.clone()
    t[idx] = value
    return t


def idx(*rows):
    return torch.tensor(rows, dtype=I64)


def noncontig(*shape):
    """A (..., a, b) view with a non-unit inner stride: the transpose of a contiguous (..., b, a)."""
    return r(*shape[:-2], shape[-1], shape[-2]).transpose(-1, -2)


@dataclass
class Case:
    op: str
    name: str
    make: Callable[[], tuple[tuple, dict]]  # -> (args, kwargs)
    raises: type | None = None  # None: the result must equal the float64 reference's
    match: str = ""
    backends: tuple = BACKENDS  # ("",) for an op without a backend switch
    only: dict = field(default_factory=dict)  # backend -> (error, match) where one backend refuses


def bad(op, name, make, raises, match, **kw):
    return Case(op, name, make, raises, match, **kw)


def ok(op, name, make, **kw):
    return Case(op, name, make, **kw)


def gather(x=None, index=None, **kw):
    x = r(2, 5, 3) if x is None else x
    return (x, idx([0, 4], [1, 2]) if index is None else index), kw


def unshuffle(x_vis=None, ids=None, token=None, **kw):
    x_vis = r(2, 3, 4) if x_vis is None else x_vis  # 1 prefix + 2 visible of L = 4
    ids = idx([2, 0, 3, 1], [1, 3, 0, 2]) if ids is None else ids
    return (x_vis, ids, r(4) if token is None else token), {"num_prefix": 1} | kw


def ema(t=None, s=None, m=0.9):
    return ([r(3), r(2, 2)] if t is None else t, [r(3), r(2, 2)] if s is None else s, m), {}


def attn(q=None, topk=2, **kw):
    q = r(1, 2, 4, 8) if q is None else q
    return (q, r(*q.shape, dtype=q.dtype).to(q.device), r(*q.shape, dtype=q.dtype).to(q.device), topk), kw


def cosine(p=None, t=None, **kw):
    p = r(2, 3, 4) if p is None else p
    return (p, r(*p.shape) if t is None else t), kw


def mse(p=None, t=None, m=None, **kw):
    p = r(2, 3, 4) if p is None else p
    return (p, r(*p.shape) if t is None else t, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]) if m is None else m), kw


def dino(s=None, t=None, c=None, **kw):  # 3 views x batch 2, 2 global, K = 5
    return (r(6, 5) if s is None else s, r(4, 5) if t is None else t, torch.zeros(5) if c is None else c), kw


def contrastive(z=None, labels=None, **kw):
    return (r(2, 4, 3) if z is None else z, idx([0, 0, 1, 1], [2, 2, 2, 0]) if labels is None else labels), kw


NOT_INT, NOT_FLOAT = "must be an int, got", "must be a float"
CASES = [
    # gather_tokens
    bad("gather_tokens", "x_int", lambda: gather(x=torch.ones(2, 5, 3, dtype=I64)), TypeError, "x must have dtype"),
    bad("gather_tokens", "x_rank2", lambda: gather(x=r(5, 3)), ValueError, "x must have 3 dimensions"),
    bad("gather_tokens", "x_list", lambda: gather(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    bad("gather_tokens", "index_float", lambda: gather(index=torch.zeros(2, 2)), TypeError, "index must have dtype"),
    bad("gather_tokens", "no_tokens", lambda: gather(x=r(2, 0, 3), index=torch.zeros(2, 1, dtype=I64)), IndexError,
        r"gather_tokens: x has no tokens \(x shape \(2, 0, 3\)\) but index asks for 1 per row"),
    bad("gather_tokens", "index_rows", lambda: gather(index=idx([0, 1])), ValueError, "index must have B·groups"),
    bad("gather_tokens", "index_too_big", lambda: gather(index=idx([0, 5], [1, 2])), IndexError, r"index .*\[0, 5\)"),
    bad("gather_tokens", "index_negative", lambda: gather(index=idx([0, -1], [1, 2])), IndexError, r"index .*\[0, 5\)"),
    bad("gather_tokens", "groups_bool", lambda: gather(groups=True), TypeError, "groups " + NOT_INT),
    bad("gather_tokens", "groups_str", lambda: gather(groups="1"), TypeError, "groups " + NOT_INT),
    bad("gather_tokens", "groups_zero", lambda: gather(groups=0), ValueError, "groups must be an int >= 1"),
    bad("gather_tokens", "pos_embed_shape", lambda: gather(pos_embed=r(4, 3)), ValueError, r"pos_embed must have shape \(5, 3\)"),
    bad("gather_tokens", "prefix_width", lambda: gather(prefix=r(1, 2)), ValueError, r"prefix must have shape \(\*, 3\)"),
    ok("gather_tokens", "empty_index", lambda: gather(index=torch.zeros(2, 0, dtype=I64), prefix=r(1, 3))),
    ok("gather_tokens", "single", lambda: gather(x=r(1, 1, 1), index=idx([0]), pos_embed=r(1, 1))),
    ok("gather_tokens", "noncontig_x", lambda: gather(x=noncontig(2, 5, 3), pos_embed=r(5, 3), prefix=r(1, 3))),
    ok("gather_tokens", "nan_x", lambda: gather(x=nan_at(r(2, 5, 3), 0, 4, 1))),
    ok("gather_tokens", "groups2", lambda: gather(index=idx([0, 4], [1, 2], [3, 3], [2, 0]), groups=2)),
    # unshuffle_tokens
    bad("unshuffle_tokens", "num_prefix_bool", lambda: unshuffle(num_prefix=True), TypeError, "num_prefix " + NOT_INT),
    bad("unshuffle_tokens", "num_prefix_str", lambda: unshuffle(num_prefix="1"), TypeError, "num_prefix " + NOT_INT),
    bad("unshuffle_tokens", "num_prefix_negative", lambda: unshuffle(num_prefix=-1), ValueError, r"num_prefix must be an int in \[0, 3\]"),
    bad("unshuffle_tokens", "num_prefix_too_big", lambda: unshuffle(num_prefix=4), ValueError, r"num_prefix must be an int in \[0, 3\]"),
    bad("unshuffle_tokens", "ids_float", lambda: unshuffle(ids=torch.zeros(2, 4)), TypeError, "ids_restore must have dtype"),
    bad("unshuffle_tokens", "ids_too_big", lambda: unshuffle(ids=idx([4, 0, 3, 1], [1, 3, 0, 2])), IndexError, r"ids_restore .*\[0, 4\)"),
    bad("unshuffle_tokens", "ids_batch", lambda: unshuffle(ids=idx([2, 0, 3, 1])), ValueError, "ids_restore must have B = 2 rows"),
    bad("unshuffle_tokens", "token_width", lambda: unshuffle(token=r(3)), ValueError, "mask_token must hold D = 4"),
    bad("unshuffle_tokens", "too_many_visible", lambda: unshuffle(x_vis=r(2, 6, 4)), ValueError, "more than the L = 4"),
    ok("unshuffle_tokens", "none_visible", lambda: unshuffle(x_vis=r(2, 1, 4), pos_embed=r(5, 4))),
    ok("unshuffle_tokens", "noncontig_x_vis", lambda: unshuffle(x_vis=noncontig(2, 3, 4), pos_embed=r(5, 4))),
    ok("unshuffle_tokens", "nan_token", lambda: unshuffle(token=nan_at(r(4), 2))),
    # random_masking (index generation: no backend switch)
    bad("random_masking", "B_float", lambda: ((2.0, 4, 0.5), {}), TypeError, "B " + NOT_INT, backends=("",)),
    bad("random_masking", "L_bool", lambda: ((2, True, 0.5), {}), TypeError, "L " + NOT_INT, backends=("",)),
    bad("random_masking", "B_negative", lambda: ((-1, 4, 0.5), {}), ValueError, "B must be an int >= 0", backends=("",)),
    bad("random_masking", "ratio_str", lambda: ((2, 4, "0.5"), {}), TypeError, "mask_ratio " + NOT_FLOAT, backends=("",)),
    bad("random_masking", "ratio_none", lambda: ((2, 4, None), {}), TypeError, "mask_ratio " + NOT_FLOAT, backends=("",)),
    bad("random_masking", "ratio_one", lambda: ((2, 4, 1.0), {}), ValueError, r"mask_ratio .*in \[0, 1\)", backends=("",)),
    bad("random_masking", "ratio_nan", lambda: ((2, 4, float("nan")), {}), ValueError, "mask_ratio must be a finite", backends=("",)),
    bad("random_masking", "noise_list", lambda: ((2, 4, 0.5), {"noise": [[0.1] * 4] * 2}), TypeError, "noise must be a torch.Tensor", backends=("",)),
    bad("random_masking", "noise_shape", lambda: ((2, 4, 0.5), {"noise": r(2, 3)}), ValueError, r"noise must have shape \(2, 4\)", backends=("",)),
    bad("random_masking", "noise_int", lambda: ((2, 4, 0.5), {"noise": torch.ones(2, 4, dtype=I64)}), TypeError, "noise must have dtype", backends=("",)),
    # ema_update_
    bad("ema_update_", "momentum_none", lambda: ema(m=None), TypeError, "momentum must be a float or a 0-dim tensor"),
    bad("ema_update_", "momentum_str", lambda: ema(m="0.5"), TypeError, "momentum must be a float or a 0-dim tensor"),
    bad("ema_update_", "momentum_bool", lambda: ema(m=True), TypeError, "momentum must be a float or a 0-dim tensor"),
    bad("ema_update_", "momentum_range", lambda: ema(m=1.5), ValueError, r"momentum .*in \[0, 1\]"),
    bad("ema_update_", "momentum_nan", lambda: ema(m=float("nan")), ValueError, "momentum must be a finite"),
    bad("ema_update_", "momentum_1d", lambda: ema(m=torch.tensor([0.9])), ValueError, "0-dim tensor, got shape"),
    bad("ema_update_", "momentum_int_tensor", lambda: ema(m=torch.tensor(1)), TypeError, "0-dim floating tensor"),
    bad("ema_update_", "lengths", lambda: ema(s=[r(3)]), ValueError, "teacher has 2 tensors but student has 1"),
    bad("ema_update_", "shapes", lambda: ema(s=[r(3), r(4)]), ValueError, "pair 1: teacher shape"),
    bad("ema_update_", "int_dtype", lambda: ema(t=[torch.ones(3, dtype=I64), r(2, 2)]), TypeError, "pair 0: dtypes"),
    bad("ema_update_", "single_tensor", lambda: ema(t=r(3)), TypeError, "teacher must be a sequence"),
    ok("ema_update_", "empty_pairs", lambda: ema(t=[r(0), r(1)], s=[r(0), r(1)])),
    ok("ema_update_", "tensor_momentum", lambda: ema(m=torch.tensor(0.25))),
    ok("ema_update_", "nan_student", lambda: ema(s=[nan_at(r(3), 1), r(2, 2)])),
    ok("ema_update_", "noncontig", lambda: ema(t=[noncontig(2, 3)], s=[noncontig(2, 3)]),
       only={"triton": (BackendUnavailable, "not contiguous")}),
    # topk_attention
    bad("topk_attention", "head_dim_0", lambda: attn(q=r(1, 2, 4, 0)), ValueError, "head dim d .* >= 1"),
    bad("topk_attention", "topk_bool", lambda: attn(topk=True), TypeError, "topk " + NOT_INT),
    bad("topk_attention", "topk_float", lambda: attn(topk=2.0), TypeError, "topk " + NOT_INT),
    bad("topk_attention", "topk_zero", lambda: attn(topk=0), ValueError, "topk must be an int >= 1"),
    bad("topk_attention", "scale_str", lambda: attn(scale="0.5"), TypeError, "scale " + NOT_FLOAT),
    bad("topk_attention", "scale_nan", lambda: attn(scale=float("nan")), ValueError, "scale must be a finite"),
    bad("topk_attention", "rank3", lambda: attn(q=r(2, 4, 8)), ValueError, "q must have 4 dimensions"),
    bad("topk_attention", "int_dtype", lambda: attn(q=torch.ones(1, 1, 2, 2, dtype=I64)), TypeError, "q must have dtype"),
    bad("topk_attention", "shapes", lambda: ((r(1, 2, 4, 8), r(1, 2, 5, 8), r(1, 2, 4, 8), 2), {}), ValueError, "share one shape"),
    bad("topk_attention", "dtypes", lambda: ((r(1, 1, 2, 4), r(1, 1, 2, 4, dtype=F16), r(1, 1, 2, 4), 1), {}), TypeError, "share one dtype"),
    bad("topk_attention", "last_dim_strided", lambda: attn(q=noncontig(1, 2, 4, 8)), ValueError, "q must be contiguous in its last"),
    ok("topk_attention", "single_key", lambda: attn(q=r(1, 1, 1, 4), topk=3)),
    ok("topk_attention", "heads_strided", lambda: ((r(1, 4, 2, 8).transpose(1, 2),) * 3 + (2,), {})),
    ok("topk_attention", "nan_v_dense", lambda: ((r(1, 1, 3, 4), r(1, 1, 3, 4), nan_at(r(1, 1, 3, 4), 0, 0, 1, 2), 3), {})),
    # cosine_loss
    bad("cosine_loss", "dim_float", lambda: cosine(dim=1.0), TypeError, "dim " + NOT_INT),
    bad("cosine_loss", "dim_str", lambda: cosine(dim="1"), TypeError, "dim " + NOT_INT),
    bad("cosine_loss", "dim_bool", lambda: cosine(dim=True), TypeError, "dim " + NOT_INT),
    bad("cosine_loss", "dim_range", lambda: cosine(dim=3), ValueError, r"dim=3 is out of range .*\[-3, 2\]"),
    bad("cosine_loss", "eps_str", lambda: cosine(eps="1e-6"), TypeError, "eps " + NOT_FLOAT),
    bad("cosine_loss", "eps_negative", lambda: cosine(eps=-1.0), ValueError, "eps must be a finite float >= 0"),
    bad("cosine_loss", "shapes", lambda: cosine(t=r(2, 3, 5)), ValueError, "pred and target must share one shape"),
    bad("cosine_loss", "int_dtype", lambda: cosine(p=torch.ones(2, 3, dtype=I64)), TypeError, "pred must have dtype"),
    bad("cosine_loss", "empty", lambda: cosine(p=r(0, 4)), ValueError, "pred is empty"),
    ok("cosine_loss", "single", lambda: cosine(p=r(1, 1))),
    ok("cosine_loss", "noncontig", lambda: cosine(p=noncontig(2, 3, 4), t=noncontig(2, 3, 4), dim=1)),
    ok("cosine_loss", "nan_pred", lambda: cosine(p=nan_at(r(2, 3, 4), 1, 1, 1))),
    # masked_mse_loss
    bad("masked_mse_loss", "rank2", lambda: mse(p=r(2, 3)), ValueError, "pred must have 3 dimensions"),
    ok("masked_mse_loss", "mask_float64", lambda: mse(m=torch.ones(2, 3, dtype=F64)), only=FP64_ON_TRITON),
    bad("masked_mse_loss", "mask_shape", lambda: mse(m=torch.ones(2, 4)), ValueError, r"mask must have shape \(2, 3\)"),
    bad("masked_mse_loss", "shapes", lambda: mse(t=r(2, 3, 5)), ValueError, "pred and target must share one shape"),
    bad("masked_mse_loss", "mask_empty", lambda: mse(m=torch.zeros(2, 3)), ValueError, "mask selects no patch"),
    bad("masked_mse_loss", "patch_width_0", lambda: mse(p=r(2, 3, 0)), ValueError, "patches are empty"),
    ok("masked_mse_loss", "nan_unmasked_pred", lambda: mse(p=nan_at(r(2, 3, 4), 0, 1, 2))),
    ok("masked_mse_loss", "inf_unmasked_target", lambda: mse(t=nan_at(r(2, 3, 4), 1, 0, 0, value=float("inf")))),
    ok("masked_mse_loss", "nan_masked_pred", lambda: mse(p=nan_at(r(2, 3, 4), 0, 0, 0))),
    ok("masked_mse_loss", "single", lambda: mse(p=r(1, 1, 1), m=torch.ones(1, 1))),
    ok("masked_mse_loss", "bool_mask_noncontig", lambda: mse(p=noncontig(2, 3, 4), m=torch.tensor([[True, False, True], [False] * 3]))),
    ok("masked_mse_loss", "mask_weights", lambda: mse(m=torch.tensor([[2.0, 0.0, 0.5], [0.0, 1.0, 0.0]]))),  # documented
    ok("masked_mse_loss", "mask_sums_to_zero", lambda: mse(m=torch.tensor([[1.0, 0.0, -1.0], [0.0] * 3]))),  # documented: inf/NaN
    # dino_loss
    bad("dino_loss", "num_global_bool", lambda: dino(num_global=True), TypeError, "num_global " + NOT_INT),
    bad("dino_loss", "num_global_float", lambda: dino(num_global=2.0), TypeError, "num_global " + NOT_INT),
    bad("dino_loss", "num_global_zero", lambda: dino(num_global=0), ValueError, "num_global must be an int >= 1"),
    bad("dino_loss", "student_temp_tiny", lambda: dino(student_temp=1e-40), ValueError, "student_temp must be a finite float >= 0.0001"),
    bad("dino_loss", "teacher_temp_tiny", lambda: dino(teacher_temp=1e-40), ValueError, "teacher_temp must be a finite float >= 0.0001"),
    bad("dino_loss", "teacher_temp_zero", lambda: dino(teacher_temp=0.0), ValueError, "teacher_temp must be a finite float >= 0.0001"),
    bad("dino_loss", "student_temp_str", lambda: dino(student_temp="0.1"), TypeError, "student_temp " + NOT_FLOAT),
    bad("dino_loss", "student_temp_none", lambda: dino(student_temp=None), TypeError, "student_temp " + NOT_FLOAT),
    bad("dino_loss", "teacher_temp_inf", lambda: dino(teacher_temp=float("inf")), ValueError, "teacher_temp must be a finite"),
    bad("dino_loss", "center_momentum_range", lambda: dino(center_momentum=1.5), ValueError, r"center_momentum .*in \[0, 1\]"),
    bad("dino_loss", "center_momentum_str", lambda: dino(center_momentum="0.9"), TypeError, "center_momentum " + NOT_FLOAT),
    bad("dino_loss", "width_0", lambda: dino(s=r(6, 0), t=r(4, 0), c=torch.zeros(0)), ValueError, "width K .* must be >= 1, got K = 0"),
    bad("dino_loss", "widths", lambda: dino(c=torch.zeros(4)), ValueError, "must share the output width K"),
    bad("dino_loss", "rows", lambda: dino(t=r(3, 5)), ValueError, "not a positive multiple of num_global=2"),
    bad("dino_loss", "int_dtype", lambda: dino(s=torch.ones(6, 5, dtype=I64)), TypeError, "student_out must have dtype"),
    ok("dino_loss", "single_class", lambda: dino(s=r(2, 1), t=r(2, 1), c=torch.zeros(1), update_center=False)),
    ok("dino_loss", "noncontig", lambda: dino(s=noncontig(6, 5), update_center=False)),
    ok("dino_loss", "nan_student", lambda: dino(s=nan_at(r(6, 5), 4, 2), update_center=False)),
    bad("update_center_", "momentum_str", lambda: ((torch.zeros(5), r(4, 5), "0.9"), {}), TypeError, "momentum " + NOT_FLOAT, backends=("",)),
    bad("update_center_", "momentum_bool", lambda: ((torch.zeros(5), r(4, 5), True), {}), TypeError, "momentum " + NOT_FLOAT, backends=("",)),
    bad("update_center_", "width", lambda: ((torch.zeros(4), r(4, 5), 0.9), {}), ValueError, "must share the width K", backends=("",)),
    bad("update_center_", "no_rows", lambda: ((torch.zeros(5), r(0, 5), 0.9), {}), ValueError, "teacher_out has no rows", backends=("",)),
    ok("update_center_", "row_center", lambda: ((torch.zeros(1, 5), r(4, 5), 0.9), {}), backends=("",)),
    # homologous_contrastive_loss
    bad("homologous_contrastive_loss", "temperature_tiny", lambda: contrastive(temperature=1e-10), ValueError, "temperature must be a finite float >= 0.0001"),
    bad("homologous_contrastive_loss", "temperature_str", lambda: contrastive(temperature="0.07"), TypeError, "temperature " + NOT_FLOAT),
    bad("homologous_contrastive_loss", "temperature_bool", lambda: contrastive(temperature=True), TypeError, "temperature " + NOT_FLOAT),
    bad("homologous_contrastive_loss", "labels_float", lambda: contrastive(labels=torch.zeros(2, 4)), TypeError, "labels must have dtype"),
    bad("homologous_contrastive_loss", "labels_shape", lambda: contrastive(labels=idx([0, 0, 1])), ValueError, r"labels must have 2 dimensions|labels must have shape"),
    bad("homologous_contrastive_loss", "labels_negative", lambda: contrastive(labels=idx([0, 0, 1, -1], [2, 2, 2, 0])), IndexError, "labels must be non-negative"),
    bad("homologous_contrastive_loss", "z_rank2", lambda: contrastive(z=r(4, 3)), ValueError, "z must have 3 dimensions"),
    ok("homologous_contrastive_loss", "no_positive", lambda: contrastive(z=r(1, 1, 3), labels=idx([0]))),
    ok("homologous_contrastive_loss", "empty", lambda: contrastive(z=r(0, 4, 3), labels=torch.zeros(0, 4, dtype=I64)),
       only={"triton": (BackendUnavailable, "is empty")}),
    ok("homologous_contrastive_loss", "noncontig", lambda: contrastive(z=noncontig(2, 4, 3))),
    ok("homologous_contrastive_loss", "nan_z", lambda: contrastive(z=nan_at(r(2, 4, 3), 1, 2, 0))),
    ok("homologous_contrastive_loss", "at_min_temperature", lambda: contrastive(temperature=1e-4)),
]


def in_float64(make):
    """``make``'s inputs with every floating tensor (and those of tensor lists) in float64."""
    def up(a):
        if isinstance(a, torch.Tensor):
            return a.double() if a.is_floating_point() else a
        return [up(x) for x in a] if isinstance(a, list) else a

    def made():
        args, kwargs = make()
        return [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
    return made


# float64 through every op: the torch reference serves it (in float64); triton refuses it and says why.
FP64_CASES = [
    ok("gather_tokens", "float64", in_float64(lambda: gather(pos_embed=r(5, 3), prefix=r(1, 3))), only=FP64_ON_TRITON),
    ok("unshuffle_tokens", "float64", in_float64(lambda: unshuffle(pos_embed=r(5, 4))), only=FP64_ON_TRITON),
    ok("ema_update_", "float64", in_float64(ema), only=FP64_ON_TRITON),
    ok("ema_update_", "float64_teacher_of_fp32", lambda: ema(t=[r(3, dtype=F64), r(2, 2, dtype=F64)]), only=FP64_ON_TRITON),
    ok("topk_attention", "float64", in_float64(attn), only=FP64_ON_TRITON),
    ok("cosine_loss", "float64", in_float64(lambda: cosine(dim=1, standardize_dim=-1)), only=FP64_ON_TRITON),
    ok("masked_mse_loss", "float64", in_float64(mse), only=FP64_ON_TRITON),
    ok("dino_loss", "float64", in_float64(dino), only=FP64_ON_TRITON),
    ok("update_center_", "float64", in_float64(lambda: ((torch.zeros(5), r(4, 5), 0.9), {})), backends=("",)),
    ok("homologous_contrastive_loss", "float64", in_float64(contrastive), only=FP64_ON_TRITON),
    ok("random_masking", "noise_float64", lambda: ((2, 4, 0.5), {"noise": r(2, 4, dtype=F64)}), backends=("",)),
]
CASES += FP64_CASES
if "standardize_dim" in inspect.signature(sdae_fast.cosine_loss).parameters:  # every axis argument is checked
    CASES += [bad("cosine_loss", "standardize_dim_bool", lambda: cosine(standardize_dim=True), TypeError, "standardize_dim " + NOT_INT),
              bad("cosine_loss", "standardize_dim_range", lambda: cosine(standardize_dim=5), ValueError, "standardize_dim=5 is out of range")]


@pytest.fixture(params=["deferred", "eager"])
def check_mode(request, monkeypatch):
    monkeypatch.setenv("SDAE_FAST_CHECKS", request.param)
    return request.param


def _call(case, backend, args, kwargs):
    fn = getattr(sdae_fast, case.op)
    return fn(*args, **kwargs, backend=backend) if backend else fn(*args, **kwargs)


def _reference(case, args, kwargs):
    """The float64 reference on copies of the inputs (the in-place ops then return their teacher)."""
    def up(a):
        if isinstance(a, torch.Tensor):
            return a.detach().clone().double() if a.is_floating_point() else a.clone()
        return [up(x) for x in a] if isinstance(a, list) else a
    args, kwargs = [up(a) for a in args], {k: up(v) for k, v in kwargs.items()}
    out = getattr(reference, case.op)(*args, **kwargs)
    return args[0] if case.op in IN_PLACE else out


def _compare(case, out, want, args):
    if case.op in IN_PLACE:
        out = args[0]
    outs, wants = (out, want) if isinstance(out, (list, tuple)) else ([out], [want])
    terms = max([1] + [a.numel() for a in args if isinstance(a, torch.Tensor)])
    for o, w in zip(outs, wants):
        if o.is_floating_point():
            assert_close(o, w, dtype=o.dtype, reduction=terms, name=case.name)
        else:
            assert torch.equal(o, w), case.name


IN_PLACE = ("ema_update_", "update_center_")  # compared by their first argument, updated in place
PARAMS = [pytest.param(c, b, id=f"{c.op}-{c.name}" + (f"-{b}" if b else "")) for c in CASES for b in c.backends]


@pytest.mark.parametrize("case,backend", PARAMS)
def test_bad_input(case, backend, check_mode):
    args, kwargs = case.make()
    error, match = case.only.get(backend, (case.raises, case.match))
    if error is not None:
        with pytest.raises(error, match=match) as raised:
            _call(case, backend, args, kwargs)
            check_errors()
        if raised.type in (TypeError, ValueError, IndexError):  # host-side and deferred checks name the op
            assert str(raised.value).startswith(f"{case.op}: "), str(raised.value)
        return
    want = _reference(case, args, kwargs)
    out = _call(case, backend, args, kwargs)
    check_errors()
    _compare(case, out, want, args)


META = {  # op -> inputs on the meta device
    "gather_tokens": lambda m: gather(x=r(2, 5, 3).to(m), index=idx([0, 4], [1, 2]).to(m)),
    "unshuffle_tokens": lambda m: unshuffle(x_vis=r(2, 3, 4).to(m), ids=idx([2, 0, 3, 1], [1, 3, 0, 2]).to(m), token=r(4).to(m)),
    "ema_update_": lambda m: ema(t=[r(3).to(m)], s=[r(3).to(m)]),
    "topk_attention": lambda m: attn(q=r(1, 2, 4, 8).to(m)),
    "cosine_loss": lambda m: cosine(p=r(2, 3, 4).to(m), t=r(2, 3, 4).to(m)),
    "masked_mse_loss": lambda m: mse(p=r(2, 3, 4).to(m), t=r(2, 3, 4).to(m), m=torch.ones(2, 3).to(m)),
    "dino_loss": lambda m: dino(s=r(6, 5).to(m), t=r(4, 5).to(m), c=torch.zeros(5).to(m)),
    "homologous_contrastive_loss": lambda m: contrastive(z=r(2, 4, 3).to(m), labels=idx([0, 0, 1, 1], [2, 2, 2, 0]).to(m)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", sorted(META))
def test_meta_tensors_work_or_are_refused_clearly(op, backend, check_mode):
    """Meta tensors either give meta outputs (shape inference) or an error that says "meta" and why,
    never a raw ``.item()`` failure from inside a value check."""
    args, kwargs = META[op]("meta")
    try:
        out = getattr(sdae_fast, op)(*args, **kwargs, backend=backend)
        check_errors()
    except (TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
        msg = str(exc)
        assert "meta" in msg and "item()" not in msg, f"{op}: unclear error for meta tensors: {msg}"
        return
    assert out is None or out.is_meta


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_mse_unmasked_nan_gets_zero_gradient(backend):
    """NaN/inf in unmasked patches reach neither the loss nor pred's gradient, on both backends."""
    pred = nan_at(nan_at(r(2, 3, 4), 0, 1, 2), 1, 0, 0, value=float("inf")).requires_grad_()
    target, mask = nan_at(r(2, 3, 4), 1, 2, 1), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    loss = sdae_fast.masked_mse_loss(pred, target, mask, backend=backend)
    loss.backward()
    check_errors()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    assert (pred.grad[mask == 0] == 0).all()
    clean = pred.detach().where(mask[..., None] != 0, 0.0).requires_grad_()
    want = reference.masked_mse_loss(clean.double(), target.where(mask[..., None] != 0, 0.0).double(), mask)
    want.backward()
    assert_close(loss, want, dtype=F32, reduction=pred.numel())
    assert_close(pred.grad, clean.grad, dtype=F32, reduction=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_agree_at_the_temperature_bound(backend):
    """At MIN_TEMPERATURE both backends give finite losses and gradients equal to the float64
    reference's. The bound counts exp()'s conditioning as test_dino_loss does: a logit x = sim / T
    rounded in fp32 is off by ~eps·|x|, which exp turns into a relative error, so the tolerance's
    term count is at least ceil(max|x|)² (|sim| <= 1 for unit vectors: max|x| <= 1/T)."""
    from sdae_fast.validate import MIN_TEMPERATURE as T

    z = r(2, 9, 16).requires_grad_()
    labels = torch.randint(0, 3, (2, 9))
    z64 = z.detach().double().requires_grad_()
    loss = sdae_fast.homologous_contrastive_loss(z, labels, temperature=T, backend=backend)
    want = reference.homologous_contrastive_loss(z64, labels, temperature=T)
    loss.backward(), want.backward()
    terms = max(z.numel(), math.ceil(1 / T) ** 2)
    assert torch.isfinite(z.grad).all()
    assert_close(loss, want, dtype=F32, reduction=terms, name="contrastive loss")
    assert_close(z.grad, z64.grad, dtype=F32, reduction=terms, name="contrastive grad")

    s, t, c = r(6, 33).requires_grad_(), r(4, 33), torch.zeros(33)
    s64 = s.detach().double().requires_grad_()
    loss = sdae_fast.dino_loss(s, t, c, student_temp=T, teacher_temp=T, update_center=False, backend=backend)
    want = reference.dino_loss(s64, t.double(), c.double(), student_temp=T, teacher_temp=T, update_center=False)
    loss.backward(), want.backward()
    terms = max(s.numel(), math.ceil(max(s.abs().max().item(), t.abs().max().item()) / T) ** 2)
    assert torch.isfinite(s.grad).all()
    assert_close(loss, want, dtype=F32, reduction=terms, name="dino loss")
    assert_close(s.grad, s64.grad, dtype=F32, reduction=terms, name="dino grad")


@pytest.mark.parametrize("case", [c for c in FP64_CASES if c.backends != ("",) or c.op in IN_PLACE],
                         ids=lambda c: f"{c.op}-{c.name}")
def test_float64_stays_float64_on_the_reference(case):
    """Without a backend (the automatic choice) float64 inputs reach the torch reference, which
    computes in float64: float64 outputs with the bits of the reference called directly."""
    args, kwargs = case.make()
    want = _reference(case, args, kwargs)
    out = _call(case, "", args, kwargs)
    out = args[0] if case.op in IN_PLACE else out
    outs, wants = (out, want) if isinstance(out, (list, tuple)) else ([out], [want])
    for o, w in zip(outs, wants):
        assert o.dtype == F64 and torch.equal(o, w), case.name
