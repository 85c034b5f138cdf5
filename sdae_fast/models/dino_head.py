"""DINO's projection head (facebookresearch/dino ``vision_transformer.py`` ``DINOHead``).

An MLP (``nlayers`` linears, GELU, optional BatchNorm after each hidden linear: ``use_bn``) to a
bottleneck, L2 normalisation, then a weight-normalised bias-free last layer. As officially:

* the MLP linears are trunc-normal(0.02) with zero bias;
* the last layer is built as ``nn.Linear(bottleneck, out, bias=False)`` *after* that init, so its
  direction ``weight_v`` keeps PyTorch's default Linear init (kaiming-uniform, a=√5) and draws the
  same random numbers; ``weight_g`` is filled with 1 and frozen when ``norm_last_layer``.

``WeightNormLinear`` computes what ``torch.nn.utils.weight_norm`` (deprecated) computes, with the
same parameter names (``last_layer.weight_g`` / ``weight_v``), so DINO checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """``y = x Wᵀ`` with ``W = v · (g / ||v||)``, the norm per output row (bias-free)."""

    def __init__(self, in_dim: int, out_dim: int, freeze_norm: bool = True):
        super().__init__()
        direction = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # PyTorch's default init
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not freeze_norm)
        self.weight_v = nn.Parameter(direction.clone())

    def forward(self, x):
        # torch._weight_norm's expression: v * (g / norm_except_dim(v, 2, 0)).
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))
        return F.linear(x, w)


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            layers = []
            for i in range(nlayers - 1):
                layers.append(nn.Linear(dims[i], dims[i + 1]))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, freeze_norm=norm_last_layer)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
