"""Every Triton kernel variant the dispatcher can pick at the SPEC shapes, as offline-compile jobs
for :func:`sdae_fast.sm90.compile_facts`, with what each variant promises:

- ``registers``: the kernel holds its tile in registers, so the compiled code must not spill
  (``stack_ok``: except for that many stack bytes, a scalar, never a tile);
- ``exact``: bit-exact against the reference is promised, so no FFMA (fused multiply-add rounds
  once where the reference rounds the product and the sum separately);
- ``hgmma``: a 16-bit attention path at N <= 256 must run on Hopper's wgmma.

``full=False`` gives the representative subset CI compiles on every PR (the SPEC's common shapes);
``full=True`` every dtype × head dim × N bucket × autotune config left after pruning.
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

DTYPES = ("fp32", "fp16", "bf16")
_TL = {"fp32": "tl.float32", "fp16": "tl.float16", "bf16": "tl.bfloat16"}
_TORCH = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Variant:
    job: dict
    registers: bool = True
    exact: bool = False
    hgmma: bool = False
    note: str = ""  # why a promise is not made (shown in docs/kernels.md)
    stack_ok: int = 0  # stack bytes accepted with ``registers`` (one loop scalar ptxas parks; see note)
    no_fma: tuple = ()  # fp32 scalar arguments whose products must be rounded on their own (no FMA)


def _signature(fn, types: dict) -> dict:
    """Triton signature of ``fn``: constexprs marked, other arguments typed by ``types`` (int32 when absent)."""
    while hasattr(fn, "fn"):  # Autotuner -> JITFunction (or the interpreter's) -> the Python function
        fn = fn.fn
    params = inspect.signature(fn).parameters.values()
    return {p.name: "constexpr" if "constexpr" in str(p.annotation) else types.get(p.name, "i32") for p in params}


def _job(module: str, name: str, types: dict, constants: dict, options: dict, label: str) -> dict:
    fn = getattr(importlib.import_module(module), name)
    return dict(module=module, name=name, signature=_signature(fn, types), constants=constants, options=options,
                label=label)


def _torch_dtype(name):
    import torch

    return getattr(torch, _TORCH[name])


# ------------------------------------------------------------------------------------------------
def ema(full: bool) -> list[Variant]:
    from sdae_fast.kernels import ema as k
    from sdae_fast.multi_tensor import BLOCK_ELEMS

    types = {"t_ptrs": "*i64", "s_ptrs": "*i64", "numels": "*i64", "block_tensor": "*i32", "block_start": "*i64",
             "m_ptr": "*fp32", "m": "fp32", "one_minus_m": "fp32"}
    pairs = [(t, s) for t in DTYPES for s in DTYPES] if full else [("fp32", "fp32"), ("bf16", "fp32")]
    out = []
    for t, s in pairs:
        for on_device in (False, True):
            for aligned in ((False, True) if full else (on_device,)):
                constants = dict(T_DTYPE=_TL[t], S_DTYPE=_TL[s], M_ON_DEVICE=on_device, ALIGNED=aligned,
                                 BLOCK=BLOCK_ELEMS)
                label = f"t={t} s={s} m_dev={int(on_device)} aligned={int(aligned)}"
                out.append(Variant(_job(k.__name__, "_ema_kernel", types, constants, dict(k.LAUNCH_OPTIONS), label),
                                   exact=True))
    return out


# ------------------------------------------------------------------------------------------------
TOPK_HEAD_DIMS = (32, 64, 80, 128)
TOPK_N = (16, 64, 197, 257, 577, 1024)  # tiny, DINO-local-like, ViT/16 at 224, ViT-H/14, 384 px, SPEC's max


def _topk_cases(full: bool):
    if full:
        return [(dt, d, n) for dt in DTYPES for d in TOPK_HEAD_DIMS for n in TOPK_N]
    return [("fp32", 64, 197), ("fp16", 64, 197), ("bf16", 80, 257), ("bf16", 64, 1024)]


def _pruned(tuner, named_args: dict):
    prune = tuner.early_config_prune
    return prune(tuner.configs, named_args) if prune else tuner.configs


def topk_attention(full: bool) -> list[Variant]:
    from sdae_fast.kernels import topk_attention as k

    out = []
    for dt, d, n in _topk_cases(full):
        ptr = "*" + dt
        if dt == "fp32" and n > k.FP32_MAX_N:  # refused (kernels.topk_attention.why_not): the reference serves it
            continue
        fwd, bwd = k.launch_meta(n, d, _torch_dtype(dt))
        fwd_types = dict(Q=ptr, K=ptr, V=ptr, O=ptr, TAU="*fp32", TAU_COL="*i32", LSE="*fp32", scale="fp32")
        bwd_types = dict(Q=ptr, K=ptr, V=ptr, DO=ptr, TAU="*fp32", TAU_COL="*i32", LSE="*fp32", DELTA="*fp32",
                         DK=ptr, DV=ptr, DQ=ptr, scale="fp32")
        hgmma = dt != "fp32" and n <= 256
        for select in ((True, False) if full else (True,)):
            for stage in k.fwd_stages(fwd["N_PAD"], fwd["PRECISION"], select):
                constants = {**fwd, "SELECT": select, "STAGE": stage}
                for cfg in _pruned(k._fwd_tuned, constants):
                    c = {**constants, **cfg.kwargs}
                    label = (f"{dt} d={d} N={n} select={int(select)} stage={stage} BM={c['BLOCK_M']} "
                             f"w={cfg.num_warps} st={cfg.num_stages}")
                    opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                    # 16-bit rows of 512-1024 keys attend (stage 2) on wgmma; their selection cannot.
                    known = dict(registers=False, note="known: 1024 selection keys next to 128-wide head-dim "
                                 "tiles spill") if stage == 1 and c["N_PAD"] == 1024 and c["BLOCK_D"] == 128 else {}
                    out.append(Variant(_job(k.__name__, "_topk_attention_fwd", fwd_types, c, opts, "fwd " + label),
                                       hgmma=hgmma or (dt != "fp32" and stage == 2), **known))
        for tuner, name in ((k._bwd_dkdv_tuned, "_topk_attention_bwd_dkdv"),
                            (k._bwd_dq_tuned, "_topk_attention_bwd_dq")):
            for cfg in _pruned(tuner, bwd):
                c = {**bwd, **cfg.kwargs}
                label = f"{dt} d={d} N={n} BM={c['BLOCK_M']} BN={c['BLOCK_N']} w={cfg.num_warps} st={cfg.num_stages}"
                opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
                out.append(Variant(_job("sdae_fast.kernels.topk_attention_bwd", name, bwd_types, c, opts, label),
                                   hgmma=hgmma))
    return out


# ------------------------------------------------------------------------------------------------
def contrastive_loss(full: bool) -> list[Variant]:
    from sdae_fast.kernels import contrastive_loss as k

    out = []
    for dt in (DTYPES if full else ("fp32", "bf16")):
        blocks, block_do, warps = k.gpu_blocks(_torch_dtype(dt))
        ptr = "*" + dt
        for normalize in ((False, True) if full else (True,)):
            fwd_types = dict(z_ptr=ptr, r_ptr="*fp32", lab_ptr="*i64", lse_ptr="*fp32", cnt_ptr="*fp32",
                             loss_ptr="*fp32", inv_t="fp32")
            c = {**blocks, "NORMALIZE": normalize}
            label = f"{dt} normalize={int(normalize)}"
            out.append(Variant(_job(k.__name__, "_contrastive_fwd_kernel", fwd_types, c, dict(num_warps=warps), label)))
            bwd_types = dict(fwd_types, r3_ptr="*fp32", scale_ptr="*fp32", p_ptr="*fp32", dz_ptr=ptr)
            c = {**c, "BLOCK_DO": block_do, "SPLIT_W": dt != "fp32", "ROW_SCALE": dt == "fp16" and normalize}
            out.append(Variant(_job(k.__name__, "_contrastive_bwd_kernel", bwd_types, c, dict(num_warps=warps), label)))
    return out


def dino_loss(full: bool) -> list[Variant]:
    from sdae_fast.kernels import dino_loss as k

    out = []
    for dt in (DTYPES if full else ("bf16",)):
        ptr = "*" + dt
        partials = {n: "*fp32" for n in ("c_ptr", "ms_ptr", "ls_ptr", "mt_ptr", "lt_ptr", "loss_ptr")}
        types = dict(partials, s_ptr=ptr, t_ptr=ptr, g_ptr=ptr, inv_ts="fp32", inv_tt="fp32", grad_scale="fp32")
        for views in ((2, 10, 12) if full else (10,)):  # global crops only; DINO's 2 + 8 and 2 + 10 crops
            vp, gp = max(2, k._next_pow2(views)), 2
            block_k = k.gpu_block_k(vp * gp)
            shape = dict(V=views, G=2, VP=vp, GP=gp, BLOCK_K=block_k)
            label = f"{dt} V={views} G=2 BLOCK_K={block_k}"
            # The scaled logits s/Ts and (t - c)/Tt, rounded before they meet a subtraction in both
            # sweeps: the same statistics in each, and a tensor teacher_temp (pre-sharpened, run at
            # Tt = 1) equal to its float bit for bit.
            scaled = ("inv_ts", "inv_tt")
            out.append(Variant(_job(k.__name__, "_dino_stats_kernel", types, shape, dict(num_warps=8), label),
                               no_fma=scaled))
            grad = dict(shape, SP=k.MAX_SPLITS, WRITE_GRAD=True)  # SP: the padded count of K-splits
            out.append(Variant(_job(k.__name__, "_dino_grad_kernel", types, grad, dict(num_warps=8), label),
                               no_fma=scaled))
    return out


# ------------------------------------------------------------------------------------------------
TOKEN_DIMS = (192, 384, 768, 1024, 1280)  # ViT-Ti .. ViT-H widths


def tokens(full: bool) -> list[Variant]:
    """The token movers (MAE's gather and unshuffle, their backward sums) and the value checks, at
    the GPU geometry of their launchers: 32-bit offsets and the int64 (``WIDE``) ones of > 2^31
    element tensors."""
    from sdae_fast.kernels import gather_tokens as g, unshuffle_tokens as u, value_checks as vc

    out = []
    opts = dict(g.GPU_LAUNCH)
    # The backward sums loop over images: some Triton versions park one 4-byte loop value on the
    # stack (one STL before the loop, one LDL an image; sm_90 SASS, Triton 3.6 and 3.8).
    parked = dict(stack_ok=8, note="one 4-byte loop scalar may sit on the stack")
    for dt in (DTYPES if full else ("bf16", "fp16")):
        ptr = "*" + dt
        # ViT-S: 128-wide D tiles, the most rows a program; ViT-B: 256-wide tiles of 16 rows (where
        # an fp16 unshuffle once spilled a register).
        for dim in (TOKEN_DIMS if full else (384, 768)):
            block_d = g.feature_block(dim, interpreter=False)
            block_r = g.row_block(block_d, 1 << 20, interpreter=False)
            for wide in (False, True):
                label = f"{dt} D={dim} BLOCK_D={block_d} rows={block_r} wide={int(wide)}"
                c = dict(HAS_POS=True, HAS_PREFIX=True, WIDE=wide, BLOCK_R=block_r, BLOCK_D=block_d)
                types = dict(x_ptr=ptr, index_ptr="*i64", pos_ptr=ptr, prefix_ptr=ptr, out_ptr=ptr)
                out.append(Variant(_job(g.__name__, "_gather_fwd_kernel", types, c, opts, label)))
                types = dict(x_ptr=ptr, ids_ptr="*i64", mask_ptr=ptr, pos_ptr=ptr, out_ptr=ptr)
                c = dict(HAS_POS=True, WIDE=wide, BLOCK_R=block_r, BLOCK_D=block_d)
                out.append(Variant(_job(u.__name__, "_unshuffle_fwd_kernel", types, c, opts, label)))
                for det in ((False, True) if full else (False,)):
                    sums = f"{label} deterministic={int(det)}"
                    types = dict(grad_ptr=ptr, index_ptr="*i64", count_ptr="*i32", reader_ptr="*i64" if wide else "*i32",
                                 dx_ptr=ptr, dparam_ptr="*fp32")
                    c = dict(NEED_X=True, NEED_PARAM=True, WIDE=wide, DETERMINISTIC=det, BLOCK_U=block_r,
                             BLOCK_D=block_d)
                    out.append(Variant(_job(g.__name__, "_segment_sum_kernel", types, c, opts, sums), **parked))
                    types = dict(grad_ptr=ptr, ids_ptr="*i64", dmask_ptr="*fp32", dpos_ptr="*fp32")
                    c = dict(NEED_MASK=True, NEED_POS=True, WIDE=wide, DETERMINISTIC=det, BLOCK_T=block_r,
                             BLOCK_D=block_d)
                    out.append(Variant(_job(u.__name__, "_unshuffle_param_grads_kernel", types, c, opts, sums),
                                       **parked))
    for wide in (False, True):
        types = dict(index_ptr="*i64", count_ptr="*i32", reader_ptr="*i64" if wide else "*i32")
        out.append(Variant(_job(g.__name__, "_count_readers_kernel", types, dict(WIDE=wide, BLOCK=1024), opts,
                                f"wide={int(wide)}")))
    block_r, block_c = vc.tiles(64, 147)  # a (batch, kept tokens) index of MAE at ViT/16, 224 px
    for all_zero in (False, True):
        types = dict(x_ptr="*u8" if all_zero else "*i64", table_ptr="*i64")
        c = dict(ALL_ZERO=all_zero, BLOCK_R=block_r, BLOCK_C=block_c)
        out.append(Variant(_job(vc.__name__, "_value_check_kernel", types, c, {}, f"all_zero={int(all_zero)} 64x147")))
    return out


GROUPS = {"ema": ema, "topk_attention": topk_attention, "contrastive_loss": contrastive_loss, "dino_loss": dino_loss,
          "tokens": tokens}


def variants(group: str, full: bool = False) -> list[Variant]:
    return GROUPS[group](full)
