"""Datasets for ``sdae-fast pretrain`` and the deterministic, shardable batch sampler.

Two sources:

* the embedded default, scikit-learn's ``load_digits`` (ships with scikit-learn, no download):
  1797 grey 8x8 digits scaled to [0, 1], upsampled bilinearly to ``img_size`` and normalised with the
  train split's mean and std. The last ``holdout`` fraction is the fixed held-out split (for k-NN).
* an image folder laid out like torchvision's ``ImageFolder`` (``root/<class>/<image>``; images
  directly under ``root`` form one class), loaded with PIL, resized to ``img_size``, RGB,
  normalised with the ImageNet mean/std. Its held-out split is every ``1/holdout``-th image.

Both are held in memory as one tensor: the datasets this command targets are small, and in-memory
batches keep a resumed run bit-identical to an uninterrupted one without worker RNG to restore.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def load_digits_splits(img_size: int = 32, holdout: float = 0.2) -> ImageSplits:
    """scikit-learn's digits as (N, 1, img_size, img_size); the last ``holdout`` fraction is held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is only needed for this embedded dataset
        raise ImportError(
            "the embedded digits dataset needs scikit-learn: pip install 'sdae_fast[data]' "
            "(or pass --data PATH to an image folder)") from exc
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values 0..16
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    if img_size != images.shape[-1]:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    n_train = len(images) - int(round(len(images) * holdout))
    mean, std = images[:n_train].mean(), images[:n_train].std()
    images = (images - mean) / std
    return ImageSplits(images[:n_train].contiguous(), labels[:n_train], images[n_train:].contiguous(),
                       labels[n_train:], [str(i) for i in range(10)], "digits")


def _list_images(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    folders = [(os.path.join(root, d), i) for i, d in enumerate(subdirs)] or [(root, 0)]
    classes = subdirs or [os.path.basename(os.path.normpath(root))]
    files = []
    for folder, label in folders:
        for dirpath, _, names in sorted(os.walk(folder)):
            files += [(os.path.join(dirpath, n), label) for n in sorted(names)
                      if n.lower().endswith(IMAGE_EXTENSIONS)]
    return files, classes


def load_image_folder_splits(root: str, img_size: int = 32, holdout: float = 0.2) -> ImageSplits:
    """An ImageFolder-like directory as RGB tensors; every round(1/holdout)-th image is held out."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"--data {root!r}: no such file or directory")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--data {root!r} is not a directory (expected class subfolders of images)")
    files, classes = _list_images(root)
    if not files:
        raise ValueError(f"--data {root!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                         "directly inside it or in class subfolders)")
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("loading an image folder needs Pillow: pip install pillow") from exc
    images = []
    for path, _ in files:
        try:
            with Image.open(path) as im:
                im = im.convert("RGB").resize((img_size, img_size), Image.BILINEAR)
                images.append(torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
                              .view(img_size, img_size, 3).permute(2, 0, 1))
        except OSError as exc:
            raise ValueError(f"cannot read image {path!r}: {exc}") from exc
    x = torch.stack(images).float() / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    y = torch.tensor([label for _, label in files], dtype=torch.long)
    every = max(2, int(round(1.0 / holdout))) if holdout > 0 else 0
    held = torch.zeros(len(x), dtype=torch.bool)
    if every:
        held[every - 1::every] = True
    return ImageSplits(x[~held].contiguous(), y[~held], x[held].contiguous(), y[held], classes,
                       os.path.basename(os.path.normpath(root)))


def load_splits(data: str | None, img_size: int = 32, holdout: float = 0.2) -> ImageSplits:
    """``data=None`` is the embedded digits; otherwise an image folder."""
    if data is None:
        return load_digits_splits(img_size, holdout)
    return load_image_folder_splits(data, img_size, holdout)


class EpochBatchSampler:
    """Deterministic batches: epoch ``e`` shuffles with a generator seeded ``seed + e``.

    Distributed like ``DistributedSampler``: every rank draws the same permutation and takes
    ``perm[rank::world]``, cut to the same length on every rank. Incomplete last batches are dropped
    so every step sees ``batch_size`` images (MixedAE needs a multiple of its group size).
    A position is (epoch, batch index), so resuming mid-epoch restarts at the exact batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = n // world
        self.steps_per_epoch = self.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n} training images over {world} process(es) do not fill one batch of "
                             f"{batch_size}; lower --batch-size")

    def indices(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n, generator=gen)
        return perm[self.rank::self.world][: self.per_rank]

    def batches(self, epoch: int, start: int = 0):
        """Yield (batch index, index tensor) for the epoch from batch ``start`` on."""
        idx = self.indices(epoch)
        for b in range(start, self.steps_per_epoch):
            yield b, idx[b * self.batch_size:(b + 1) * self.batch_size]
