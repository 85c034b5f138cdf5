"""End-to-end training-step benchmark of the four methods at ViT-B/16 (GPU only).

One step = forward + backward + AdamW step + ``after_step`` (the EMA update) under bf16 autocast,
on random 224 px images: MAE/SdAE/MixedAE B = 64, DINO B = 32 with 2 × 224 + 8 × 96 crops.

Variants: ``fused`` (backend=None: the fastest available op per input), ``naive``
(backend="torch": the reference ops), ``compile(reference)`` (``torch.compile`` of the
backend="torch" model's forward), ``compile(fused)`` (``torch.compile`` of the fused model's
forward: the Triton kernels are ``triton_op`` s, so Inductor sees them; what ``sdae-fast pretrain
--compile`` runs), and ``compile(fused step)`` (``TrainStep``: forward, backward, AdamW and EMA in
one ``torch.compile(fullgraph=True)`` graph). Eager vs compiled: ``fused`` vs the two compile rows.
``--quick``: MAE's step, fused and naive only.

FLOPs (so the report shows model FLOP utilisation) are the usual transformer estimate: a matrix
product with P weights costs 2·P per token forward and 4·P backward, so a trained part costs
6·P·tokens and a forward-only part (the EMA teacher) 2·P·tokens, with P the weights of the blocks
(+ patch embedding, decoder projections, DINO head); attention adds 4·T²·D per layer and sequence
forward (QKᵀ and AV), ×3 when trained. Optimizer, EMA, losses and gathers are not counted.
"""
from __future__ import annotations

import torch
from torch import nn

from .harness import Case, compile_fresh, register

SIZE = "base"
BATCH = {"mae": 64, "sdae": 64, "mixedae": 64, "dino": 32}
VARIANTS = ("fused", "naive", "compile(reference)", "compile(fused)", "compile(fused step)")
QUICK_VARIANTS = ("fused", "naive")  # --quick: MAE only, eager (a ViT-B compile takes tens of seconds)


def _linear_params(*modules: nn.Module) -> int:
    return sum(m.weight.numel() for mod in modules for m in mod.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def _part(params: int, seqs: int, tokens: int, depth: int, width: int, trained: bool) -> int:
    """FLOPs of a transformer part: dense matmuls plus attention over ``seqs`` sequences of ``tokens``."""
    mult = 3 if trained else 1
    return mult * (2 * params * seqs * tokens + depth * 4 * seqs * tokens ** 2 * width)


def step_flops(method: str, model: nn.Module, batch: int) -> int:
    enc = model.encoder
    n, d, depth = enc.num_patches, enc.embed_dim, len(enc.blocks)
    p_enc = _linear_params(enc)
    if method == "dino":
        v_g, v_l = 2, model.num_local
        g_tok = (model.global_size // enc.patch_size) ** 2 + 1
        l_tok = (model.local_size // enc.patch_size) ** 2 + 1
        p_head = _linear_params(model.head)
        student = (_part(p_enc, v_g * batch, g_tok, depth, d, True) + _part(p_enc, v_l * batch, l_tok, depth, d, True)
                   + 6 * p_head * (v_g + v_l) * batch)
        teacher = _part(p_enc, v_g * batch, g_tok, depth, d, False) + 2 * p_head * v_g * batch
        return student + teacher
    dec = model.decoder
    p_dec, dd = _linear_params(dec), dec.embed.out_features
    decoder = _part(p_dec, batch, 1 + n, len(dec.blocks), dd, True)
    if method == "mixedae":
        return _part(p_enc, batch // model.group_size, 1 + n, depth, d, True) + decoder
    keep = int(n * (1 - model.mask_ratio))
    total = _part(p_enc, batch, 1 + keep, depth, d, True) + decoder
    if method == "sdae":
        total += _part(p_enc, batch * model.num_folds, 1 + model.fold_size, depth, d, False)
    return total


def _make(method: str, variant: str):
    def make():
        from ..models import build

        backend = "torch" if variant in ("naive", "compile(reference)") else None
        model = build(method, SIZE, backend=backend).cuda()
        model.set_schedule(total_steps=1000, steps_per_epoch=100)
        forward = compile_fresh(model) if variant in ("compile(reference)", "compile(fused)") else model
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                betas=(0.9, 0.95), weight_decay=0.05, fused=True)
        b = BATCH[method]
        imgs = torch.randn(b, 3, 224, 224, device="cuda")
        if method == "dino":  # the crops the data pipeline makes: one tensor per resolution
            imgs = [torch.randn(2 * b, 3, model.global_size, model.global_size, device="cuda"),
                    torch.randn(model.num_local * b, 3, model.local_size, model.local_size, device="cuda")]
        if variant == "compile(fused step)":
            from ..train.compiled_step import TrainStep

            torch._dynamo.reset()  # no earlier case's graphs count toward this one's recompile limit
            if hasattr(model, "momentum"):
                model.momentum()  # the EMA pairing is built on the host before the trace
            train_step = TrainStep(model, model, opt, autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16),
                                   compile=True)
            return lambda: train_step(imgs)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = forward(imgs)["loss"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.after_step()

        return step

    return make


@register("end_to_end")
def end_to_end_cases(device: str, quick: bool) -> list[Case]:
    if device != "cuda":
        return []  # ViT-B training steps are GPU work; nothing meaningful to time on the CPU
    from ..models import build

    out = []
    methods, variants = (["mae"], QUICK_VARIANTS) if quick else (list(BATCH), VARIANTS)
    for method in methods:
        batch = BATCH[method]
        with torch.device("meta"):
            flops = step_flops(method, build(method, SIZE), batch)
        shape = f"ViT-B/16 B={batch} bf16" + (" 2x224+8x96" if method == "dino" else "")
        for variant in variants:
            out.append(Case(f"{method} train step", shape, variant, _make(method, variant), flops=flops,
                            devices=("cuda",), note="flops: 6·P·tokens + attention (module docstring)", slow=True))
    return out
