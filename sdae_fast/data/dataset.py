"""The streaming, resumable training dataset and its collate function.

Items are addressed by a key ``(epoch, index)`` (the batch sampler yields them), and every random
draw of the augmentation comes from torch's CPU generator seeded with :func:`sample_seed` of (seed,
epoch, index), its state restored after: the same key gives the same pixels in any worker, in any
process, after any resume, and the caller's RNG (which the models use for masks) is left untouched.

Bad files: ``bad_images="error"`` raises :class:`BadImageError` naming the file (in a worker, the
DataLoader re-raises it in the main process with the message); ``"skip"`` (default) replaces it by
the next decodable image of the source (index + 1, + 2, ... deterministic, so resume stays exact),
keeps the augmentation seed of the original key, and reports the skipped paths in the batch
(``batch["skipped"]``) for the loop to count and name. More than ``max_skips`` bad files in a row
is an error. A failure inside the transform names the file too.
"""
from __future__ import annotations

import functools
import itertools

import torch
from torch.utils.data import Dataset

from .sources import BadImageError

BAD_IMAGE_POLICIES = ("skip", "error")
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one sample of one epoch (splitmix64 chained over the three)."""
    return _splitmix64(_splitmix64(_splitmix64(seed) ^ epoch) ^ index) >> 1


class AugmentedDataset(Dataset):
    """``dataset[(epoch, index)]`` -> (views, label, skipped paths); a plain ``index`` means epoch 0."""

    def __init__(self, source, transform, seed: int = 0, bad_images: str = "skip", max_skips: int = 16):
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")
        self.source, self.transform, self.seed = source, transform, seed
        self.bad_images, self.max_skips = bad_images, max_skips

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int):
        skipped = []
        for tries in range(self.max_skips + 1):
            i = (index + tries) % len(self.source)
            try:
                return i, self.source.load(i), skipped
            except BadImageError as exc:
                if self.bad_images == "error":
                    raise
                skipped.append(exc.path)
        raise BadImageError(skipped[-1], f"{len(skipped)} unreadable images in a row from index {index} "
                            f"({', '.join(skipped[:3])}, ...): is the folder corrupt?")

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        i, img, skipped = self._load(index)
        # The v2 transforms draw from the default CPU generator: seed it for this sample and put the
        # caller's state back (``torch.manual_seed``/``fork_rng`` also touch the accelerator
        # generators and cost ~100 µs a sample; this costs ~4 µs).
        gen = torch.default_generator
        state = gen.get_state()
        try:
            gen.manual_seed(sample_seed(self.seed, epoch, index))
            views = self.transform(img)
        except Exception as exc:
            raise RuntimeError(f"augmenting {self.source.describe(i)} (shape {tuple(img.shape)}) failed: "
                               f"{type(exc).__name__}: {exc}") from exc
        finally:
            gen.set_state(state)
        return views, int(self.source.labels[i]), skipped


def collate_views(samples: list, groups=None) -> dict:
    """Stack view v of every sample, then join consecutive views of one size along the batch:
    ``images`` is one (B, C, H, W) tensor for one view, else a list with one tensor per resolution,
    view-major (row v·B + b is view v of sample b), so a model runs one forward per resolution.
    ``groups`` (the transform's :attr:`Views.groups`): counts of consecutive views of one role; views
    of two roles are never joined, whatever their sizes (DINO: [global crops, local crops])."""
    n_views = len(samples[0][0])
    role_starts = set(itertools.accumulate((0, *(groups or ()))))
    joined: list[list[torch.Tensor]] = []
    for v in range(n_views):
        stacked = torch.stack([s[0][v] for s in samples])
        if joined and v not in role_starts and joined[-1][-1].shape[1:] == stacked.shape[1:]:
            joined[-1].append(stacked)
        else:
            joined.append([stacked])
    per_resolution = [g[0] if len(g) == 1 else torch.cat(g) for g in joined]
    return {"images": per_resolution[0] if n_views == 1 else per_resolution,
            "labels": torch.tensor([s[1] for s in samples], dtype=torch.long),
            "skipped": [p for s in samples for p in s[2]]}


def collate_for(dataset):
    """The ``collate_fn`` of a DataLoader over ``dataset``: :func:`collate_views` with the view
    groups of its transform (a picklable partial, for worker processes)."""
    return functools.partial(collate_views, groups=getattr(getattr(dataset, "transform", None), "groups", None))


def model_input(model, imgs: torch.Tensor):
    """What ``model.forward`` takes for a batch of plain, normalised images, without the loader
    (tests, benchmarks, library use): the images themselves, or, for a model that takes crops (DINO:
    ``global_size``, ``local_size``, ``num_local``), the digits multi-crop of every image batched per
    resolution as :func:`collate_views` does. The crops draw from the global RNG."""
    if not hasattr(model, "num_local"):
        return imgs
    from .augment import dino_views

    views = dino_views(model.global_size, model.local_size, model.num_local, (0.0,), (1.0,), "digits")
    return collate_views([(views(x), 0, []) for x in imgs], views.groups)["images"]
