"""k-NN evaluation of frozen features (DINO's ``eval_knn`` protocol).

Features are L2-normalised, so the dot product is the cosine similarity. Each held-out sample takes
its ``k`` most similar training samples; neighbour ``j`` votes for its label with weight
``exp(sim_j / T)`` (DINO: k=20, T=0.07) and the class with the largest total wins.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk: int = 1024) -> float:
    """Top-1 accuracy of temperature-weighted k-NN voting; features are normalised here."""
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise ValueError("k-NN needs a non-empty feature bank and test set")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k-NN needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    correct = 0
    for i in range(0, len(test_feats), chunk):
        sim, idx = (test_feats[i:i + chunk] @ train_feats.T).topk(k, dim=1)
        votes = sim.new_zeros(len(sim), num_classes)  # on the features' device
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += (votes.argmax(1) == test_labels[i:i + chunk]).sum().item()
    return correct / len(test_feats)
