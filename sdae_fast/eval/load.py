"""Encoders to evaluate, from a pretrain checkpoint or from an exported encoder.

* a checkpoint (``runs/.../checkpoint-*.pt``): the model is rebuilt from the run's arguments saved
  in it (method, size, image/patch size, the demo-recipe model options) and its weights loaded; the
  random-init baseline is the same build from the run's seed, as at the end of pretraining;
* an exported encoder (``encoder.pt`` + ``encoder.json`` beside it, or their folder): timm's
  ``VisionTransformer`` built from the JSON kwargs, weights loaded strict; the random-init baseline
  is that architecture with timm's own initialisation.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch


@dataclass
class LoadedEncoder:
    """The trained encoder, a factory for the same architecture at random init, and the settings
    the evaluation data needs (image size, data folder, held-out fraction from the run)."""

    encoder: torch.nn.Module
    make_random: object
    img_size: int
    in_chans: int
    run_args: dict = field(default_factory=dict)
    kind: str = "checkpoint"


def _exported_paths(path: str) -> tuple[str, str] | None:
    """(encoder.pt, encoder.json) when ``path`` is an exported encoder or its folder, else None."""
    weights = os.path.join(path, "encoder.pt") if os.path.isdir(path) else path
    if os.path.basename(weights) != "encoder.pt" or (os.path.isdir(path) and not os.path.exists(weights)):
        return None
    return weights, os.path.join(os.path.dirname(weights), "encoder.json")


def load_exported(weights: str, meta: str) -> LoadedEncoder:
    for p in (weights, meta):
        if not os.path.exists(p):
            raise FileNotFoundError(f"exported encoder: {p!r} does not exist (expected encoder.pt + encoder.json)")
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as exc:
        raise ImportError("evaluating an exported encoder needs timm: pip install 'sdae_fast[timm]'") from exc
    with open(meta) as f:
        kwargs = json.load(f)
    encoder = VisionTransformer(**kwargs)
    encoder.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    info_path = os.path.join(os.path.dirname(weights), "pretrain_info.json")
    run_args = {}
    if os.path.exists(info_path):
        with open(info_path) as f:
            run_args = json.load(f).get("args", {})

    def make_random():
        if "method" in run_args:  # exported by `sdae-fast pretrain`: the run's own build and seed
            from ..models import evaluated_encoder

            return evaluated_encoder(_builder(run_args, kwargs["img_size"], kwargs["in_chans"])())
        torch.manual_seed(0)
        return VisionTransformer(**kwargs)

    return LoadedEncoder(encoder, make_random, int(kwargs["img_size"]), int(kwargs["in_chans"]), run_args,
                         kind="exported encoder")


def _builder(args: dict, img_size: int, in_chans: int):
    """A function building the run's model as pretraining did: its method, size, options and seed."""
    from ..models import build

    def make_model():
        torch.manual_seed(int(args.get("seed", 0)))
        return build(args["method"], args.get("size", "micro"), img_size=img_size, patch_size=args.get("patch_size"),
                     in_chans=in_chans, backend=args.get("backend"), **(args.get("model_kw") or {}))

    return make_model


def load_checkpoint_encoder(path: str) -> LoadedEncoder:
    from ..models import evaluated_encoder
    from ..train.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    args = dict(state.get("args") or {})
    if "method" not in args:
        raise ValueError(f"checkpoint {path!r} does not record its run's arguments (method, size)")
    model_state = state["model"]
    in_chans = int(model_state["encoder.patch_embed.proj.weight"].shape[1])
    img_size = args.get("img_size") or 32
    make_model = _builder(args, img_size, in_chans)
    model = make_model()
    try:
        model.load_state_dict(model_state)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(f"checkpoint {path!r} does not fit the model its arguments describe "
                         f"({args['method']}, {args.get('size')}): {exc}") from exc
    return LoadedEncoder(evaluated_encoder(model), lambda: evaluated_encoder(make_model()), int(img_size), in_chans,
                         args)


def load_encoder(path: str) -> LoadedEncoder:
    """A pretrain checkpoint or an exported encoder (its ``encoder.pt``, or the folder holding it)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--checkpoint {path!r}: no such file or directory")
    exported = _exported_paths(path)
    if exported:
        return load_exported(*exported)
    if os.path.isdir(path):
        raise IsADirectoryError(f"--checkpoint {path!r} is a folder without encoder.pt + encoder.json; "
                                "give a checkpoint file or an exported encoder's folder")
    return load_checkpoint_encoder(path)
