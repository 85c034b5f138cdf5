"""k-NN evaluation of frozen features (DINO's ``eval_knn`` protocol).

Features are L2-normalised, so the dot product is the cosine similarity. Each held-out sample takes
its ``k`` most similar training samples; neighbour ``j`` votes for its label with weight
``exp(sim_j / T)`` (DINO: k=20, T=0.07) and the class with the largest total wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .features import check_finite


def _check_labels(train_labels: torch.Tensor, test_labels: torch.Tensor, num_classes: int | None) -> int:
    """The number of classes (``num_classes``, or the largest label + 1); ``ValueError`` for a negative
    label or one ``>= num_classes`` (the vote table has one column per class)."""
    for split, labels in (("train", train_labels), ("test", test_labels)):
        if int(labels.min()) < 0:
            raise ValueError(f"k-NN: the {split} labels must be class indices in [0, num_classes); "
                             f"they hold negative ones (smallest {int(labels.min())})")
        if num_classes and int(labels.max()) >= num_classes:
            outside = sorted(set(labels[labels >= num_classes].tolist()))
            raise ValueError(f"k-NN: the {split} labels must lie in [0, {num_classes}) for num_classes={num_classes}; "
                             f"they hold {', '.join(map(str, outside[:10]))}{' ...' if len(outside) > 10 else ''}")
    return num_classes or int(max(train_labels.max(), test_labels.max())) + 1


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Top-1 accuracy of temperature-weighted k-NN voting; features are normalised here."""
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("k-NN needs a non-empty feature bank and test set")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    check_finite(train_feats, "train", "k-NN")
    check_finite(test_feats, "test", "k-NN")
    num_classes = _check_labels(train_labels, test_labels, num_classes)
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    k = min(k, len(train_feats))
    correct = 0
    for i in range(0, len(test_feats), chunk):
        sim, idx = (test_feats[i:i + chunk] @ train_feats.T).topk(k, dim=1)
        votes = sim.new_zeros(len(sim), num_classes)  # on the features' device
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return correct / len(test_feats)
