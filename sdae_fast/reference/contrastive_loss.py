"""MixedAE's homologous contrastive loss (SPEC §4)."""
import torch
import torch.nn.functional as F

from .stats import accumulation_dtype, without_autocast


@without_autocast
def homologous_contrastive_loss(z, labels, *, temperature=0.07, normalize=True):
    """Supervised-contrastive loss within each mixed image, positives = same source.

    z (M, N, D), labels (M, N). ``loss_i = -mean_{j in P(i)} log softmax_{a != i}(sim_i)_j`` with
    ``sim = z·zᵀ / temperature``; anchors without positives are skipped. When no anchor has a
    positive the loss is 0 (still connected to z, so backward works).
    """
    acc = accumulation_dtype(z)
    zf = z.to(acc)
    if normalize:
        zf = F.normalize(zf, dim=-1)
    n = z.shape[1]
    sim = zf @ zf.transpose(1, 2) / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    log_prob = sim - torch.logsumexp(sim, dim=-1, keepdim=True)
    positive = (labels[:, :, None] == labels[:, None, :]) & ~self_mask
    num_pos = positive.sum(-1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(-1) / num_pos.clamp(min=1)
    has_pos = num_pos > 0
    # The mean over anchors with a positive, written without a host sync (no boolean indexing,
    # no any()): with no such anchor it is 0 / 1 = 0, still connected to z.
    return per_anchor.masked_fill(~has_pos, 0.0).sum() / has_pos.sum().clamp(min=1)
