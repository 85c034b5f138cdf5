"""Streaming data for pretraining and evaluation (issue 9 §2).

* ``sources``: an image folder decoded per item (RGB), or the embedded digits; (train, held-out).
* ``shards``: WebDataset tar shards, indexed once and read per sample at its offset (same policies).
* ``augment``: each method's paper augmentation from ``torchvision.transforms.v2``, DINO multi-crop,
  and the digits adaptation.
* ``dataset``: :class:`AugmentedDataset`, keyed by (epoch, index), augmentation seeded per sample;
  bad-file policy; :func:`collate_views` batches the crops of one size together.
* ``sampler``: :class:`ShardedBatchSampler`, DistributedSampler's sharding, resumable at (epoch, batch).
* ``loader``: the DataLoader (workers from the cores, pinned memory), :func:`to_device`.
* ``splits``: un-augmented train/held-out images for evaluation, streamed or as tensors.
"""
from .augment import dino_views, eval_views, masked_image_views, train_views
from .dataset import AugmentedDataset, collate_views, model_input, sample_seed
from .loader import default_workers, make_loader, to_device
from .sampler import ShardedBatchSampler
from .shards import ShardSource, shard_sources
from .sources import (BadImageError, FolderSource, TensorSource, digits_sources, folder_sources,
                      list_image_files, open_sources)
from .splits import ImageSplits, eval_loader, load_splits, materialize

__all__ = ["AugmentedDataset", "BadImageError", "FolderSource", "ImageSplits", "ShardSource", "ShardedBatchSampler",
           "TensorSource", "collate_views", "default_workers", "digits_sources", "dino_views", "eval_loader",
           "eval_views", "folder_sources", "list_image_files", "load_splits", "make_loader",
           "masked_image_views", "materialize", "model_input", "open_sources", "sample_seed", "shard_sources",
           "to_device", "train_views"]
