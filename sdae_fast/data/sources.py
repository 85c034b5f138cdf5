"""Where images come from: an image folder decoded per item, or the embedded digits
(WebDataset tar shards: :mod:`~sdae_fast.data.shards`).

A *source* is indexable: ``len(source)``, ``source.load(i)`` -> one image as a (C, H, W) tensor
(uint8 for decoded files, float in [0, 1] for the digits), ``source.labels`` (int64 numpy array)
and ``source.describe(i)`` (what to name in an error: the file path). Nothing is decoded before
it is asked for, so memory does not grow with the number of images.

Folder policy (documented choices):

* Layout as torchvision's ``ImageFolder``: ``root/<class>/**/<image>``; images directly under
  ``root`` (no class folders) form one class. Files with other extensions are ignored.
* Every image is decoded to **RGB** (grey is replicated, alpha dropped), so folders that mix grey,
  RGB and RGBA files train as 3-channel images.
* JPEG, PNG, WebP and GIF decode with ``torchvision.io.decode_image`` (libjpeg-turbo/libpng, no PIL
  object); other extensions (BMP, TIFF, PPM...) with PIL.
* A file that cannot be decoded raises :class:`BadImageError` naming it; the dataset decides
  whether to stop or to skip and count (``bad_images`` in :class:`~sdae_fast.data.dataset.AugmentedDataset`).
* Paths live in one bytes blob + numpy offsets (:class:`PackedStrings`), not a Python list of str.
"""
from __future__ import annotations

import io
import os
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

from ..validate import check_float

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
TORCHVISION_DECODES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImageError(ValueError):
    """An image file that cannot be decoded (unreadable, truncated or not an image)."""

    def __init__(self, path: str, reason: str | None = None):
        # One argument is a whole message: how a DataLoader re-raises a worker's exception.
        super().__init__(path if reason is None else f"cannot decode image {path!r}: {reason}")
        self.path = path if reason is not None else None


def _torchvision_decoder():
    """torchvision.io's (ImageReadMode, decode_image), or None where this torchvision has none (its
    decoding is deprecated since 0.29): PIL decodes then, rather than every image failing as bad."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    return ImageReadMode, decode_image


def decode_rgb_bytes(data: bytes | bytearray, name: str) -> torch.Tensor:
    """One encoded image as a (3, H, W) uint8 tensor; ``name`` (a path or a tar member) picks the
    decoder by its extension and is what :class:`BadImageError` names on any failure. A
    ``bytearray`` is decoded in place; ``bytes`` are copied once (torch.frombuffer wants a writable
    buffer)."""
    try:
        if name.lower().endswith(TORCHVISION_DECODES) and (tv := _torchvision_decoder()) is not None:
            ImageReadMode, decode_image = tv
            buffer = data if isinstance(data, bytearray) else bytearray(data)
            img = decode_image(torch.frombuffer(buffer, dtype=torch.uint8), mode=ImageReadMode.RGB)
            if img.ndim == 4:  # an animated GIF: (frames, 3, H, W); PIL's convert("RGB") keeps frame 0
                img = img[0]
            if img.dtype != torch.uint8:  # a 16-bit PNG: uint16, which solarise's threshold 128 misreads
                from torchvision.transforms.v2.functional import to_dtype

                img = to_dtype(img, torch.uint8, scale=True)
            return img
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)
    except Exception as exc:  # decoders raise RuntimeError, OSError, PIL's UnidentifiedImageError...
        raise BadImageError(name, f"{type(exc).__name__}: {exc}".strip()) from exc


def decode_rgb(path: str) -> torch.Tensor:
    """One file as a (3, H, W) uint8 tensor; :class:`BadImageError` naming the file on any failure."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = bytearray(os.fstat(f.fileno()).st_size)  # read straight into a writable buffer
            del data[f.readinto(data):]  # in place (a slice would copy): only a file that shrank is cut
    except OSError as exc:
        raise BadImageError(path, f"{type(exc).__name__}: {exc}") from exc
    return decode_rgb_bytes(data, path)


def list_image_files(root: str) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of an ImageFolder-like tree, sorted; clear errors if unusable."""
    if not os.path.exists(root):
        raise FileNotFoundError(f"--data {root!r}: no such file or directory")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--data {root!r} is not a directory (expected class subfolders of images)")
    subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    folders = [(os.path.join(root, d), i) for i, d in enumerate(subdirs)] or [(root, 0)]
    classes = subdirs or [os.path.basename(os.path.normpath(root))]
    paths, labels = [], []
    for folder, label in folders:
        seen = set()  # real paths walked: a link back up the tree is not followed twice
        for dirpath, dirnames, names in os.walk(folder, followlinks=True):  # as torchvision's ImageFolder
            seen.add(os.path.realpath(dirpath))
            dirnames[:] = sorted(d for d in dirnames if os.path.realpath(os.path.join(dirpath, d)) not in seen)
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, n))
                    labels.append(label)
    if not paths:
        raise ValueError(f"--data {root!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)} "
                         "directly inside it or in class subfolders)")
    return paths, labels, classes


class PackedStrings:
    """Strings (paths, tar keys) in one bytes blob + numpy end offsets, not a Python list of str:
    forked DataLoader workers touching Python objects would copy their pages (refcounts), growing
    every worker's memory with the item count."""

    def __init__(self, strings=(), *, blob: np.ndarray | None = None, ends: np.ndarray | None = None):
        if blob is None:
            encoded = [s.encode("utf-8", "surrogateescape") for s in strings]
            blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)
        self._blob, self._ends = blob, ends

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = self._ends[i - 1] if i else 0
        return self._blob[start:self._ends[i]].tobytes().decode("utf-8", "surrogateescape")

    def subset(self, keep: np.ndarray) -> "PackedStrings":
        """The strings where the boolean mask ``keep`` is set (vectorised: no str is made)."""
        lengths = np.diff(self._ends, prepend=0)
        return PackedStrings(blob=self._blob[np.repeat(keep, lengths)], ends=np.cumsum(lengths[keep]))


class FolderSource:
    """Files of an image folder (or a subset of them), decoded on demand as RGB uint8."""

    in_chans, profile = 3, "photo"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, paths, labels, classes: list[str], name: str):
        self._paths = paths if isinstance(paths, PackedStrings) else PackedStrings(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes, self.name = classes, name

    def __len__(self) -> int:
        return len(self._paths)

    def describe(self, i: int) -> str:
        return self._paths[i]

    def load(self, i: int) -> torch.Tensor:
        return decode_rgb(self.describe(i))

    def subset(self, keep: np.ndarray) -> "FolderSource":
        return FolderSource(self._paths.subset(keep), self.labels[keep], self.classes, self.name)


class TensorSource:
    """Images already in memory, (N, C, H, W) float in [0, 1]: the embedded digits."""

    profile = "digits"

    def __init__(self, images: torch.Tensor, labels, classes: list[str], name: str, mean, std):
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.classes, self.name, self.mean, self.std = classes, name, mean, std
        self.in_chans = images.shape[1]

    def __len__(self) -> int:
        return len(self.images)

    def describe(self, i: int) -> str:
        return f"{self.name} image {i}"

    def load(self, i: int) -> torch.Tensor:
        return self.images[i]


def digits_sources(img_size: int = 32, holdout: float = 0.2) -> tuple[TensorSource, TensorSource]:
    """scikit-learn's 1797 grey 8x8 digits, scaled to [0, 1] and upsampled bilinearly to ``img_size``;
    the last ``holdout`` fraction is held out; mean/std are the train split's (one channel)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # scikit-learn is only needed for this embedded dataset
        raise ImportError(
            "the embedded digits dataset needs scikit-learn: pip install 'sdae_fast[data]' "
            "(or pass --data PATH to an image folder)") from exc
    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # values 0..16
    if img_size != images.shape[-1]:
        images = F.interpolate(images, size=(img_size, img_size), mode="bilinear", align_corners=False)
    n_train = len(images) - int(round(len(images) * check_holdout(holdout)))
    mean, std = (images[:n_train].mean().item(),), (images[:n_train].std().item(),)
    classes = [str(i) for i in range(10)]
    return (TensorSource(images[:n_train].contiguous(), digits.target[:n_train], classes, "digits", mean, std),
            TensorSource(images[n_train:].contiguous(), digits.target[n_train:], classes, "digits", mean, std))


def check_holdout(holdout) -> float:
    """The held-out fraction: in [0, 1) (at 1 nothing would be left to train on)."""
    return check_float("holdout", holdout, ge=0.0, lt=1.0)


def held_out_mask(n: int, holdout: float) -> np.ndarray:
    """``floor(n·holdout)`` items held out, spread evenly: item i is held out where
    ``floor((i + 1)·h) > floor(i·h)`` (h as an exact fraction): every 5th at 0.2, every 4th at 0.25,
    2 of every 5 at 0.4."""
    h = Fraction(check_holdout(holdout)).limit_denominator(10 ** 6)
    i = np.arange(n, dtype=np.int64)
    return (i + 1) * h.numerator // h.denominator > i * h.numerator // h.denominator


def split_holdout(full, holdout: float):
    """(train, held-out) subsets of a source, the held-out items chosen by :func:`held_out_mask`."""
    held = held_out_mask(len(full), holdout)
    return full.subset(~held), full.subset(held)


def folder_sources(root: str, holdout: float = 0.2) -> tuple[FolderSource, FolderSource]:
    """Train and held-out parts of an image folder (:func:`split_holdout`)."""
    paths, labels, classes = list_image_files(root)
    return split_holdout(FolderSource(paths, labels, classes, os.path.basename(os.path.normpath(root))), holdout)


def open_sources(data: str | None, img_size: int = 32, holdout: float = 0.2):
    """``data=None`` is the embedded digits; WebDataset tar shards (a ``.tar``, a brace pattern, a
    folder of ``*.tar``: :mod:`~sdae_fast.data.shards`); otherwise an image folder. Returns (train, held-out)."""
    if data is None:
        return digits_sources(img_size, holdout)
    from .shards import is_shard_spec, shard_sources

    if is_shard_spec(data):
        return shard_sources(data, holdout)
    return folder_sources(data, holdout)
