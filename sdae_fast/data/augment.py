"""Each method's pretraining augmentation, composed from ``torchvision.transforms.v2`` (SPEC §7).

A train transform maps one image (a (C, H, W) tensor: uint8 for decoded files, float in [0, 1] for
the digits) to a **list of views**: one view for MAE/SdAE/MixedAE, ``2 + num_local`` for DINO. The
v2 transforms draw from torch's global RNG; :class:`~sdae_fast.data.dataset.AugmentedDataset`
seeds it per sample from (seed, epoch, index), so the draws never depend on worker RNG state.

Two profiles:

* ``photo`` (image folders), the papers' recipes on RGB uint8:
  - MAE / SdAE / MixedAE: RandomResizedCrop(size, scale 0.2–1, bicubic) + horizontal flip.
  - DINO: 2 global crops (scale 0.4–1) + ``num_local`` local crops (0.05–0.4), all bicubic; each
    crop: flip, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8, grayscale p 0.2; Gaussian blur with
    p 1.0 (global 1), 0.1 (global 2), 0.5 (locals), σ ∈ (0.1, 2.0) as DINO's PIL radius, on a
    13-pixel kernel (±3σ at σ = 2); solarise (threshold 128) with p 0.2 on global 2 only.
* ``digits`` (the embedded 32 px grey digits, 8x8 originals upsampled 4x), adapted because the
  photo recipe destroys them: crops keep at least half the area for MAE-family (0.5–1; at 0.2 a
  crop holds ~3.6 of the 8 original pixels) and DINO's globals (0.5–1), locals 0.2–0.5; **no
  flips** (a mirrored 2, 3, 7 is not the same digit); bilinear resizing (bicubic overshoots on the
  hard 0/1 edges of upsampled pixels); colour jitter is brightness + contrast 0.4 only, no
  grayscale (already grey); blur σ ∈ (0.1, 1.0) on a 7-pixel kernel; solarise at 0.5.

Images smaller than the crop are upsampled (RandomResizedCrop always picks a region inside the
image and resizes it), never an error.

Where it runs: per image in the DataLoader workers, on the CPU, for every device. Issue 9 allows
batched augmentation on the GPU where that is faster; it was not adopted because it could not be
measured (no GPU was lent to the sessions that built this). What was measured, on 2 CPU cores:
this per-image path against ``ImageFolder`` + the same transforms (``sdae-fast bench``'s loader
case, ``benchmarks/results/cpu-*``). Moving flips and colour to the GPU would also tie the draws
to the batch, not to (seed, epoch, index), so exact resume would need its own seeding there.
"""
from __future__ import annotations

import math

import torch
from torchvision.transforms import v2

BICUBIC, BILINEAR = v2.InterpolationMode.BICUBIC, v2.InterpolationMode.BILINEAR

PROFILES = {
    "photo": dict(mae_scale=(0.2, 1.0), global_scale=(0.4, 1.0), local_scale=(0.05, 0.4), flip=True,
                  interpolation=BICUBIC, jitter=dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1),
                  grayscale=True, blur_sigma=(0.1, 2.0), solarize_threshold=128),
    "digits": dict(mae_scale=(0.5, 1.0), global_scale=(0.5, 1.0), local_scale=(0.2, 0.5), flip=False,
                   interpolation=BILINEAR, jitter=dict(brightness=0.4, contrast=0.4),
                   grayscale=False, blur_sigma=(0.1, 1.0), solarize_threshold=0.5),
}


def _normalize(mean, std) -> list:
    # uint8 -> float in [0, 1] (a float input is left as is), then the source's mean/std.
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def _blur_kernel(sigma_max: float, size: int) -> int:
    k = 2 * math.ceil(3 * sigma_max) + 1
    return min(k, size if size % 2 else size - 1)


class Views:
    """Apply each transform to the same image: a list of views (crop-major order of the batch).

    ``groups``: how many consecutive views play each role (DINO: 2 global crops, then the locals).
    :func:`~sdae_fast.data.dataset.collate_views` never batches two roles together, so DINO's teacher
    gets the global crops alone even when the local crops have the same size (``main_dino.py``:
    ``teacher(images[:2])``)."""

    def __init__(self, transforms: list, groups=None):
        self.transforms = transforms
        self.groups = tuple(groups) if groups is not None else (len(transforms),)
        if sum(self.groups) != len(transforms) or min(self.groups, default=1) < 1:
            raise ValueError(f"Views: groups {self.groups} must be positive counts summing to {len(transforms)} views")

    def __call__(self, img):
        return [t(img) for t in self.transforms]

    def __repr__(self) -> str:
        return f"Views({len(self.transforms)} in groups {self.groups}: {self.transforms!r})"


def masked_image_views(size: int, mean, std, profile: str = "photo", scale=None) -> Views:
    """MAE / SdAE / MixedAE: one RandomResizedCrop(+flip) view."""
    p = PROFILES[profile]
    ops = [v2.RandomResizedCrop(size, scale=scale or p["mae_scale"], interpolation=p["interpolation"], antialias=True)]
    if p["flip"]:
        ops.append(v2.RandomHorizontalFlip())
    return Views([v2.Compose(ops + _normalize(mean, std))])


def _dino_crop(size, scale, blur_p, solarize_p, mean, std, p) -> v2.Compose:
    ops = [v2.RandomResizedCrop(size, scale=scale, interpolation=p["interpolation"], antialias=True)]
    if p["flip"]:
        ops.append(v2.RandomHorizontalFlip())
    ops.append(v2.RandomApply([v2.ColorJitter(**p["jitter"])], p=0.8))
    if p["grayscale"]:
        ops.append(v2.RandomGrayscale(p=0.2))
    blur = v2.GaussianBlur(_blur_kernel(p["blur_sigma"][1], size), sigma=p["blur_sigma"])
    ops.append(blur if blur_p >= 1.0 else v2.RandomApply([blur], p=blur_p))
    if solarize_p:
        ops.append(v2.RandomSolarize(p["solarize_threshold"], p=solarize_p))
    return v2.Compose(ops + _normalize(mean, std))


def dino_views(global_size: int, local_size: int, num_local: int, mean, std, profile: str = "photo",
               global_scale=None, local_scale=None) -> Views:
    """DINO's multi-crop: [global 1, global 2, local 1, ..., local n]."""
    p = PROFILES[profile]
    gs, ls = global_scale or p["global_scale"], local_scale or p["local_scale"]
    crops = [_dino_crop(global_size, gs, 1.0, 0.0, mean, std, p), _dino_crop(global_size, gs, 0.1, 0.2, mean, std, p)]
    crops += [_dino_crop(local_size, ls, 0.5, 0.0, mean, std, p) for _ in range(num_local)]
    return Views(crops, groups=(2, num_local) if num_local else (2,))


def eval_views(size: int, mean, std, profile: str = "photo") -> Views:
    """Un-augmented view for features: photos resize the short side to size/0.875 (bicubic) and take
    the centre ``size`` crop (the MAE/DINO evaluation protocol); digits are already ``size``."""
    ops = [] if profile == "digits" else [v2.Resize(round(size / 0.875), interpolation=BICUBIC, antialias=True),
                                          v2.CenterCrop(size)]
    return Views([v2.Compose(ops + _normalize(mean, std))])


def train_views(method: str, source, img_size: int, model=None) -> Views:
    """The train transform of ``method`` for ``source`` (its profile, mean and std). DINO reads its
    crop geometry from the model (``global_size``, ``local_size``, ``num_local``) when given."""
    if method == "dino":
        g = getattr(model, "global_size", img_size)
        loc = getattr(model, "local_size", max(1, round(g * 96 / 224)))
        n = getattr(model, "num_local", 8)
        return dino_views(g, loc, n, source.mean, source.std, source.profile)
    return masked_image_views(img_size, source.mean, source.std, source.profile)
