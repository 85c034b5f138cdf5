"""Training recipes: ``paper`` (each method's official ImageNet hyperparameters) and ``demo`` (the
embedded digits on a CPU, values from :mod:`sdae_fast.train.demo_recipe`).

A recipe is a flat dict of pretrain options (the ``args`` names of :mod:`sdae_fast.train.cli`) plus
``model``, the keyword arguments of ``sdae_fast.models.build``. :func:`apply_recipe` fills every
option the user left unset; an option given on the command line always wins.

Every ``paper`` value cites the official file it comes from. The repositories:
MAE = facebookresearch/mae, SdAE = AbrahamYabo/SdAE, DINO = facebookresearch/dino.
MixedAE has no public code: its recipe is a reading of the paper on top of MAE's (see below).
"""
from __future__ import annotations

import copy

from .demo_recipe import DEMO
from .optim import WEIGHT_DECAY

RECIPES = ("paper", "demo")

PAPER = {
    "mae": dict(
        size="base", img_size=224, patch_size=16,  # PRETRAIN.md: --model mae_vit_base_patch16; main_pretrain.py --input_size 224
        epochs=800,  # PRETRAIN.md: --epochs 800
        warmup_epochs=40,  # PRETRAIN.md / main_pretrain.py: --warmup_epochs 40
        batch_size=64,  # PRETRAIN.md: --batch_size 64 (per GPU)
        effective_batch=4096,  # PRETRAIN.md: 64 (batch_size) x 8 (nodes) x 8 (gpus) = 4096; accum_iter makes it up on fewer GPUs
        blr=1.5e-4,  # PRETRAIN.md: --blr 1.5e-4; main_pretrain.py: lr = blr * eff_batch_size / 256
        min_lr=0.0,  # main_pretrain.py: --min_lr 0.
        weight_decay=0.05,  # PRETRAIN.md / main_pretrain.py: --weight_decay 0.05, constant
        weight_decay_end=None,  # main_pretrain.py: no weight-decay schedule
        betas=(0.9, 0.95),  # main_pretrain.py: torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
        lr_schedule="mae",  # util/lr_sched.py adjust_learning_rate, per iteration (engine_pretrain.py)
        clip_grad=None, clip_per_param=None,  # engine_pretrain.py: loss_scaler(...) without clip_grad
        freeze_last_layer=0,  # no head to freeze
        model=dict(
            mask_ratio=0.75,  # main_pretrain.py --mask_ratio 0.75
            norm_pix_loss=True,  # PRETRAIN.md: --norm_pix_loss
            decoder_dim=512, decoder_depth=8, decoder_heads=16,  # models_mae.py mae_vit_base_patch16_dec512d8b
            drop_path_rate=0.0,  # models_mae.py: Block(...) without drop_path
            weight_init="xavier",  # models_mae.py initialize_weights: xavier_uniform_ linears and patch_embed
        ),
    ),
    "sdae": dict(
        size="base", img_size=224, patch_size=16,  # main_pretrain.py: --model mae_vit_base_patch16, --model_teacher vit_base_patch16, --input_size 224
        epochs=300,  # main_pretrain.py: --epochs 300
        warmup_epochs=60,  # main_pretrain.py: --warmup_epochs 60
        batch_size=96,  # main_pretrain.py: --batch_size 96 (per GPU)
        effective_batch=768,  # main_pretrain.py --batch_size help: "96 batch x 8 gpu"
        blr=2.666e-4,  # main_pretrain.py: --blr 2.666e-4; lr = blr * eff_batch_size / 256
        min_lr=0.0,  # main_pretrain.py: --min_lr 0.
        weight_decay=0.04,  # main_pretrain.py: add_weight_decay(model, args.weight_decay=0.04), constant
        weight_decay_end=None,  # main_pretrain.py defines --weight_decay_end but never uses it
        betas=(0.9, 0.95),  # main_pretrain.py: torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))
        lr_schedule="mae",  # engine_pretrain.py: lr_sched.adjust_learning_rate per iteration (MAE's util/lr_sched.py)
        clip_grad=None, clip_per_param=None,  # engine_pretrain.py: loss_scaler(...) without clip_grad
        freeze_last_layer=0,
        model=dict(
            mask_ratio=0.75,  # main_pretrain.py --mask_ratio 0.75
            decoder_dim=512, decoder_depth=8, decoder_heads=16,  # models_mae.py mae_vit_base_patch16_dec512d8b
            drop_path_rate=0.25,  # main_pretrain.py --drop_path 0.25 -> models_mae.py linspace(0, 0.25, depth)
            weight_init="xavier",  # models_mae.py initialize_weights
            shrink_num=147, num_folds=3,  # SPEC §7: all 147 masked tokens in 3 folds (--shrink_num 147 --ncrop_loss 3)
            loss_dim=1,  # engine_pretrain.py: F.cosine_similarity(output_teacher, outputs) default dim=1 (tokens)
            teacher_init="random",  # main_pretrain.py: models_teacher.vit_base_patch16(...) built apart, no copy
            base_momentum=0.96,  # main_pretrain.py: --momentum_teacher 0.96
            final_momentum=0.99,  # main_pretrain.py: --momentum_teacher_final 0.99
            momentum_warmup_epochs=0, momentum_warmup=0.0,  # main_pretrain.py: --momentum_teacher_warmup_ep 0, --momentum_teacher_warmup 0.0
            ema_op="per_epoch",  # main_pretrain.py: --ema_op per_epoch
            ema_frequent=1,  # main_pretrain.py: --ema_frequent 1
        ),
    ),
    "dino": dict(
        size="small", img_size=224, patch_size=16,  # main_dino.py: --arch vit_small --patch_size 16; global crops 224
        epochs=100,  # main_dino.py: --epochs 100
        warmup_epochs=10,  # main_dino.py: --warmup_epochs 10
        batch_size=64,  # main_dino.py: --batch_size_per_gpu 64
        effective_batch=None,  # main_dino.py: no accumulation; lr scales with batch_size_per_gpu * world_size
        blr=5e-4,  # main_dino.py: --lr 0.0005 at a reference batch of 256
        min_lr=1e-6,  # main_dino.py: --min_lr 1e-6
        weight_decay=0.04,  # main_dino.py: --weight_decay 0.04
        weight_decay_end=0.4,  # main_dino.py: --weight_decay_end 0.4 (cosine_scheduler per iteration)
        betas=(0.9, 0.999),  # main_dino.py: torch.optim.AdamW(params_groups), torch's default betas
        lr_schedule="dino",  # main_dino.py: utils.cosine_scheduler(..., warmup_epochs=10), indexed per iteration
        clip_grad=None,
        clip_per_param=3.0,  # main_dino.py: --clip_grad 3.0 -> utils.clip_gradients (per parameter)
        freeze_last_layer=1,  # main_dino.py: --freeze_last_layer 1
        model=dict(
            drop_path_rate=0.1,  # main_dino.py: --drop_path_rate 0.1 (student only)
            weight_init="trunc_normal",  # vision_transformer.py: trunc_normal_(std=.02) linears, cls, pos
            out_dim=65536,  # main_dino.py: --out_dim 65536
            hidden_dim=2048, bottleneck_dim=256,  # vision_transformer.py DINOHead defaults
            norm_last_layer=True,  # main_dino.py: --norm_last_layer True
            use_bn_in_head=False,  # main_dino.py: --use_bn_in_head False
            base_momentum=0.996, final_momentum=1.0,  # main_dino.py: --momentum_teacher 0.996, cosine to 1
            teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,  # main_dino.py defaults
            student_temp=0.1,  # main_dino.py DINOLoss(student_temp=0.1)
            center_momentum=0.9,  # main_dino.py DINOLoss(center_momentum=0.9)
        ),
        # Read by the data pipeline, not the model (the crops come from sdae_fast.data).
        augment=dict(
            num_local=8,  # main_dino.py: --local_crops_number 8
            global_scale=(0.4, 1.0), local_scale=(0.05, 0.4),  # main_dino.py: --global_crops_scale, --local_crops_scale
        ),
    ),
    # MixedAE (Chen et al., CVPR 2023) has no public code. This is a READING of the paper: it builds
    # on MAE, so MAE's ViT-B optimisation recipe above is kept as is (blr, betas, weight decay and
    # its groups, warm-up, schedule, batch 4096, 800 epochs), with the paper's group size r = 4
    # (SPEC §3/§7: MAE's cost) and homologous attention K ≈ N / r; the contrastive weight and
    # temperature are this project's defaults, not values read from the paper.
    "mixedae": dict(
        size="base", img_size=224, patch_size=16,
        epochs=800, warmup_epochs=40, batch_size=64, effective_batch=4096, blr=1.5e-4, min_lr=0.0,
        weight_decay=0.05, weight_decay_end=None, betas=(0.9, 0.95), lr_schedule="mae",
        clip_grad=None, clip_per_param=None, freeze_last_layer=0,
        model=dict(group_size=4, norm_pix_loss=True, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                   weight_init="xavier"),
    ),
}

# The demo recipe: the pretrain defaults for the embedded digits (a micro ViT on 32 px, a few
# minutes on a CPU), overridden per method by demo_recipe.DEMO (the tuned values).
DEMO_BASE = dict(
    size="micro", img_size=32, patch_size=4, epochs=36, batch_size=64, min_lr=1e-5, warmup_epochs=None,
    weight_decay=None, weight_decay_end=None, betas=None, lr_schedule="warmup_cosine", clip_grad=None,
    clip_per_param=None, freeze_last_layer=0, effective_batch=None, blr=None, model={},
)


def recipe(method: str, name: str) -> dict:
    """The full option dict of recipe ``name`` for ``method`` (a copy: safe to modify)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {RECIPES}")
    if name == "paper":
        return copy.deepcopy(PAPER[method])
    values = copy.deepcopy(DEMO_BASE)
    values.update(copy.deepcopy(DEMO.get(method, {})))
    values["weight_decay"] = values["weight_decay"] if values["weight_decay"] is not None else WEIGHT_DECAY[method]
    return values


def default_recipe(data) -> str:
    """``paper`` when the user points at a dataset, ``demo`` for the embedded digits."""
    return "paper" if data else "demo"


def apply_recipe(args):
    """Fill every option of ``args`` still None from its recipe (``args.recipe``, or the default for
    ``args.data``); ``model`` entries go to ``args.model_kw`` under any user-given ones. Returns args."""
    args.recipe = args.recipe or default_recipe(args.data)
    values = recipe(args.method, args.recipe)
    model_kw = values.pop("model")
    args.augment = {**values.pop("augment", {}), **(getattr(args, "augment", None) or {})}
    for key, value in values.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.recipe == "demo" and args.size != "micro":
        model_kw = {}  # the demo's model options were tuned for the micro ViT; other sizes keep their defaults
    args.model_kw = {**model_kw, **(getattr(args, "model_kw", None) or {})}
    return args


def accum_iter_for(effective_batch: int | None, batch_size: int, world: int) -> int:
    """The gradient-accumulation steps that make ``batch_size · world · accum`` the recipe's
    effective batch (MAE/SdAE main_pretrain.py: eff_batch_size = batch_size * accum_iter * world)."""
    if not effective_batch:
        return 1
    per_step = batch_size * world
    if effective_batch % per_step:
        raise ValueError(f"the recipe's effective batch {effective_batch} is not a multiple of batch size "
                         f"{batch_size} x {world} process(es); set --accum-iter")
    return max(1, effective_batch // per_step)
