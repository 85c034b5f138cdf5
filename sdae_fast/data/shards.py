"""WebDataset tar shards as a random-access source (``--data`` for multi-node runs).

A :class:`ShardSource` is map-style like a folder (``len``, ``load(i)``, ``labels``, ``describe``,
``subset``), so the (epoch, index) keys, DDP sharding, exact mid-epoch resume and the bad-file
policy of :mod:`~sdae_fast.data.dataset` work on shards unchanged.

``--data`` names shards as one of:

* a ``.tar`` file;
* a brace pattern, ``/path/train-{000000..000009}.tar`` (expanded with ``braceexpand``, as
  webdataset does; every shard must exist);
* a directory with ``*.tar`` files and no subfolders or images (its ``*.tar``, sorted).

Format and policies (documented choices):

* WebDataset's layout: an **uncompressed** tar (a ``.tar.gz`` cannot be read at an offset); a
  sample is the run of consecutive members sharing a key, the member name up to the first ``.`` of
  its file name (directories included), and the rest is the member's suffix: webdataset's rule.
* The image is the sample's first member whose suffix is an image extension of
  :data:`~sdae_fast.data.sources.IMAGE_EXTENSIONS` (``jpg``, ``jpeg``, ``png``, ``webp``...; any
  case); it decodes as in a folder (:func:`~sdae_fast.data.sources.decode_rgb_bytes`, RGB).
  Samples without an image (metadata, other modalities) are ignored.
* The label is the ``cls`` member, a non-negative integer as text (webdataset's convention);
  a sample without one gets **label 0** (as a folder without class subfolders is one class).
  Class names are ``"0"`` .. ``"<max label>"``. A ``cls`` that is not such an integer is an error.
* Order: shards as given (the pattern's order, a directory sorted), samples in tar order; the
  held-out split is the folders' rule over that order
  (:func:`~sdae_fast.data.sources.split_holdout`).
* A member that cannot be decoded raises :class:`~sdae_fast.data.sources.BadImageError` naming
  ``shard.tar:member``; the dataset skips and counts it or stops, as for a folder. A shard that is
  not a tar or is truncated (a copy cut short), a missing shard or no images at all are errors
  naming the ``--data`` value, before training.

The index is read at start from every member header (stdlib ``tarfile``: ~15 µs a member on
2 shared cores, so ~40 s for ImageNet-1k's 2.6 M members), or from its on-disk cache while a shard
is unchanged (:mod:`~sdae_fast.data.shard_index`), and kept as numpy arrays (shard id,
offset, size per sample; the keys in one bytes blob), never as Python objects per sample: memory
does not grow with the sample count in forked workers. A sample is then one ``os.pread`` at its
offset. Each process opens the shards lazily and keeps a few open (an open costs a metadata
round trip on network file systems); a forked DataLoader worker opens its own, never sharing the
parent's file offsets. (webdataset's indexed reader ``wids`` was not used: ``ShardListDataset``
wants every shard's sample count up front, copies shards into a cache folder and indexes members
as Python lists and dicts; its mmap indexer reads only the 100-byte ustar name, so a long (pax)
member name loses its extension.)

Making shards from an image folder (``pip install 'sdae_fast[webdataset]'``)::

    import webdataset as wds
    from sdae_fast.data import list_image_files

    paths, labels, classes = list_image_files("/data/imagenet/train")
    with wds.ShardWriter("/data/shards/train-%06d.tar", maxcount=10000) as sink:
        for i, (path, label) in enumerate(zip(paths, labels)):
            ext = path.rsplit(".", 1)[-1].lower()
            sink.write({"__key__": f"{i:08d}", ext: open(path, "rb").read(), "cls": str(label)})

then ``--data '/data/shards/train-{000000..000127}.tar'``. Shuffle ``paths`` first if the held-out
split should mix classes evenly (it takes every n-th sample in shard order).
"""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import torch

from .shard_index import IMAGE_SUFFIXES, cached_index
from .sources import (IMAGE_EXTENSIONS, IMAGENET_MEAN, IMAGENET_STD, BadImageError, PackedStrings,
                      decode_rgb_bytes, split_holdout)

SHARD_SUFFIX = ".tar"
MAX_OPEN_SHARDS = 64  # per process: well under the usual 1024 file descriptors, with 8 workers a node
# one row per sample: where its image member lies; the suffix is an id into the source's suffix list
MEMBER = np.dtype([("shard", np.int32), ("offset", np.int64), ("size", np.int64), ("suffix", np.uint8)])


def is_shard_spec(data: str) -> bool:
    """Does ``--data`` name tar shards (a ``.tar`` file or pattern, a folder of only shards)?"""
    return data.lower().endswith(SHARD_SUFFIX) or (os.path.isdir(data) and bool(_folder_shards(data)))


def _folder_shards(root: str) -> list[str]:
    """The ``*.tar`` files of a folder that has no subfolders and no images (else it is an image folder)."""
    names = sorted(os.listdir(root))
    if any(os.path.isdir(os.path.join(root, n)) or n.lower().endswith(IMAGE_EXTENSIONS) for n in names):
        return []
    return [os.path.join(root, n) for n in names if n.lower().endswith(SHARD_SUFFIX)]


def shard_paths(data: str) -> list[str]:
    """The shard files ``--data`` names, in order; clear errors naming ``data`` when one is missing."""
    if os.path.isdir(data):
        if not (paths := _folder_shards(data)):
            raise ValueError(f"--data {data!r}: a folder of shards must hold *{SHARD_SUFFIX} files and no "
                             "subfolders or images")
        return paths
    if "{" in data:
        try:
            from braceexpand import braceexpand
        except ImportError as exc:
            raise ImportError(f"--data {data!r}: brace patterns need braceexpand: "
                              "pip install 'sdae_fast[webdataset]'") from exc
        paths = list(braceexpand(data))
    else:
        paths = [data]
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(paths) == 1 and missing:
        raise FileNotFoundError(f"--data {data!r}: no such file")
    if len(missing) == len(paths):
        raise FileNotFoundError(f"--data {data!r}: none of its {len(paths)} shards exists (e.g. {missing[0]!r})")
    if missing:
        raise FileNotFoundError(f"--data {data!r}: {len(missing)} of {len(paths)} shards do not exist "
                                f"(first: {missing[0]!r})")
    return paths


class ShardSource:
    """Samples of WebDataset tar shards (or a subset of them), decoded on demand as RGB uint8."""

    in_chans, profile = 3, "photo"
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, shards: list[str], suffixes: list[str], members: np.ndarray, keys: PackedStrings,
                 labels, classes: list[str], name: str):
        self.shards, self.suffixes, self._members, self._keys = shards, suffixes, members, keys
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes, self.name = classes, name
        self._files, self._pid = OrderedDict(), os.getpid()

    def __len__(self) -> int:
        return len(self._members)

    def __getstate__(self) -> dict:
        # A spawned worker gets the index, not this process's open files.
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def describe(self, i: int) -> str:
        m = self._members[i]
        return f"{self.shards[m['shard']]}:{self._keys[i]}.{self.suffixes[m['suffix']]}"

    def _file(self, shard: int):
        if self._pid != os.getpid():  # a forked worker: drop (and so close) its copies of the parent's
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.pop(shard, None)
        if f is None:
            f = open(self.shards[shard], "rb", buffering=0)
            if len(self._files) >= MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
        self._files[shard] = f
        return f

    def read(self, i: int) -> bytearray:
        """The encoded bytes of sample ``i``'s image member (writable: decoded without a copy)."""
        m = self._members[i]
        size = int(m["size"])
        data = bytearray(size)
        try:
            got = os.preadv(self._file(int(m["shard"])).fileno(), [data], int(m["offset"]))
        except OSError as exc:
            raise BadImageError(self.describe(i), f"{type(exc).__name__}: {exc}") from exc
        if got != size:  # the shard shrank after it was indexed
            raise BadImageError(self.describe(i), f"read {got} of {size} bytes: shard truncated")
        return data

    def load(self, i: int) -> torch.Tensor:
        return decode_rgb_bytes(self.read(i), self.describe(i))

    def subset(self, keep: np.ndarray) -> "ShardSource":
        return ShardSource(self.shards, self.suffixes, self._members[keep], self._keys.subset(keep),
                           self.labels[keep], self.classes, self.name)


def open_shards(data: str) -> ShardSource:
    """Every sample of the shards ``--data`` names, each shard's index read from the cache
    (:mod:`~sdae_fast.data.shard_index`) or from its tar."""
    paths = shard_paths(data)
    parts = [cached_index(path, data) for path in paths]
    counts = [len(p.labels) for p in parts]
    if not sum(counts):
        raise ValueError(f"--data {data!r}: its {len(paths)} shard(s) hold no images (looked for members "
                         f"with suffix {', '.join(sorted(IMAGE_SUFFIXES))})")
    suffixes = sorted({s for p in parts for s in p.suffixes})
    table = np.empty(sum(counts), dtype=MEMBER)
    table["shard"] = np.repeat(np.arange(len(parts)), counts)
    table["offset"] = np.concatenate([p.offsets for p in parts])
    table["size"] = np.concatenate([p.sizes for p in parts])
    # each shard's suffix ids -> ids into the merged ``suffixes``
    table["suffix"] = np.concatenate([np.array([suffixes.index(s) for s in p.suffixes] or [0], dtype=np.uint8)
                                      [p.suffix_ids] for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    blob_starts = np.cumsum([0] + [len(p.keys) for p in parts[:-1]])
    keys = PackedStrings(blob=np.concatenate([p.keys for p in parts]),
                         ends=np.concatenate([p.key_ends + start for p, start in zip(parts, blob_starts)]))
    name = os.path.basename(os.path.normpath(data))
    name = name[: -len(SHARD_SUFFIX)] if name.lower().endswith(SHARD_SUFFIX) else name
    return ShardSource(paths, suffixes, table, keys, labels, [str(c) for c in range(labels.max() + 1)], name)


def shard_sources(data: str, holdout: float = 0.2) -> tuple[ShardSource, ShardSource]:
    """Train and held-out parts of the shards (:func:`~sdae_fast.data.sources.split_holdout`)."""
    return split_holdout(open_shards(data), holdout)
