"""Un-augmented images for evaluation (k-NN, linear probe): streamed, or materialised as tensors.

* :func:`eval_loader` streams (normalised images, labels) of a source through DataLoader workers:
  use it for folders too large to hold in memory.
* :func:`load_splits` materialises the train and held-out splits as tensors (:class:`ImageSplits`):
  convenient for the digits and small folders.

Both use :func:`~sdae_fast.data.augment.eval_views` (photos: resize + centre crop; digits as is),
normalised with the source's mean/std: the same normalisation as training.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from .augment import eval_views
from .dataset import AugmentedDataset, collate_for
from .loader import default_workers
from .sources import open_sources


@dataclass
class ImageSplits:
    """Normalised images (N, C, H, W) float32 and integer labels for the train and held-out splits."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    heldout_images: torch.Tensor
    heldout_labels: torch.Tensor
    classes: list
    name: str

    @property
    def in_chans(self) -> int:
        return self.train_images.shape[1]


def eval_loader(source, img_size: int, batch_size: int = 256, workers: int | None = None,
                bad_images: str = "error") -> DataLoader:
    """Batches ``{"images": (B, C, img_size, img_size), "labels": (B,)}`` of ``source`` in order,
    un-augmented (every image once; the last batch may be short)."""
    dataset = AugmentedDataset(source, eval_views(img_size, source.mean, source.std, source.profile),
                               bad_images=bad_images)
    batches = BatchSampler(SequentialSampler(range(len(dataset))), batch_size, drop_last=False)
    workers = default_workers() if workers is None else workers
    return DataLoader(dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate_for(dataset))


def eval_batches(source, img_size: int, batch_size: int = 256, workers: int | None = None,
                 bad_images: str = "error"):
    """The batches of :func:`eval_loader`, the digits read in this process (indexed in memory: no
    workers); once all are out, the images skipped under ``bad_images="skip"`` are warned about,
    counted and named, as in training."""
    skipped = []
    for batch in eval_loader(source, img_size, batch_size, 0 if source.profile == "digits" else workers, bad_images):
        skipped += batch["skipped"]
        yield batch
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) of {source.name} for the evaluation: "
                      f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", RuntimeWarning, stacklevel=2)


def materialize(source, img_size: int, workers: int | None = None,
                bad_images: str = "error") -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``source`` as (images, labels) tensors (:func:`eval_batches`)."""
    batches = list(eval_batches(source, img_size, workers=workers, bad_images=bad_images))
    if not batches:
        shape = (0, source.in_chans, img_size, img_size)
        return torch.empty(shape), torch.empty(0, dtype=torch.long)
    return torch.cat([b["images"] for b in batches]), torch.cat([b["labels"] for b in batches])


def load_splits(data: str | None, img_size: int = 32, holdout: float = 0.2, workers: int | None = None,
                bad_images: str = "error", sources=None) -> ImageSplits:
    """Train and held-out splits (``data=None``: the embedded digits; else an image folder or tar
    shards) as normalised, un-augmented tensors. ``sources``: the (train, held-out) sources already
    opened for ``data`` (the training loop's), so a folder is not listed nor shards indexed again.
    ``bad_images="skip"`` puts the next decodable image (and its label) in an undecodable file's
    place, as in training."""
    train, held = sources if sources is not None else open_sources(data, img_size, holdout)
    x, y = materialize(train, img_size, workers, bad_images)
    hx, hy = materialize(held, img_size, workers, bad_images)
    return ImageSplits(x, y, hx, hy, list(train.classes), train.name)
