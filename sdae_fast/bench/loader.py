"""Data loader throughput: ``sdae_fast.data`` vs ``torchvision.datasets.ImageFolder`` (CPU work).

Same generated JPEG folder, same torchvision v2 transforms (the method's recipe), same batch size
and worker count, both DataLoaders with persistent workers; one timed call is one pass over the
folder, so images/s = images / time. ``naive`` is ImageFolder (PIL decode, v2 on the PIL image);
``sdae_fast`` decodes with ``torchvision.io`` to uint8 tensors, seeds the draws per sample and
batches DINO's crops per resolution.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from .harness import Case, register

_FOLDERS: dict = {}


def jpeg_folder(n: int, size=(112, 128)) -> str:
    """A class-folder tree of ``n`` random JPEGs (made once per process)."""
    if n not in _FOLDERS:
        from PIL import Image

        root = tempfile.mkdtemp(prefix=f"sdae_fast_bench_{n}_")
        rng = np.random.default_rng(0)
        for i in range(n):
            folder = os.path.join(root, f"c{i % 10}")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i:06d}.jpg"), quality=85)
        _FOLDERS[n] = root
    return _FOLDERS[n]


def _views(method: str, crop: int):
    from ..data import dino_views, masked_image_views
    from ..data.sources import IMAGENET_MEAN, IMAGENET_STD

    if method == "dino":
        return dino_views(crop, crop * 96 // 224 // 8 * 8 or 8, 8, IMAGENET_MEAN, IMAGENET_STD)
    return masked_image_views(crop, IMAGENET_MEAN, IMAGENET_STD)


def _epoch(loader):
    def run():
        for _ in loader:
            pass

    return run


def _make(variant: str, method: str, n: int, crop: int, batch: int, workers: int):
    def make():
        from torch.utils.data import DataLoader

        root = jpeg_folder(n)
        views = _views(method, crop)
        if variant == "naive":
            from torchvision import datasets
            from torchvision.transforms import v2

            # the same transforms, each preceded by PIL -> tensor (ImageFolder yields PIL images)
            pil_views = type(views)([v2.Compose([v2.ToImage(), t]) for t in views.transforms])
            dataset = datasets.ImageFolder(root, transform=pil_views)
            loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                                persistent_workers=workers > 0)
        else:
            from ..data import AugmentedDataset, ShardedBatchSampler, folder_sources, make_loader

            train, _ = folder_sources(root, holdout=0.0)
            sampler = ShardedBatchSampler(len(train), batch)
            loader = make_loader(AugmentedDataset(train, views), sampler, workers)
        return _epoch(loader)

    return make


@register("loader")
def loader_cases(device: str, quick: bool) -> list[Case]:
    # Host work (decoding, augmentation) on either device: it feeds the GPU from the CPU's cores.
    from ..data import default_workers

    workers = default_workers()
    out = []
    for method, n, crop in (("mae", 256 if quick else 2048, 96 if quick else 224),
                            ("dino", 64 if quick else 512, 96 if quick else 224)):
        shape = f"{n} JPEG 128x112 crop {crop} B=32 workers={workers}"
        for variant in ("sdae_fast", "naive"):
            out.append(Case(f"loader {method} epoch", shape, variant, _make(variant, method, n, crop, 32, workers),
                            note=f"one call = {n} images; images/s = {n} / time", slow=True))
    return out
